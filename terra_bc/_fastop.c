/* terra_bc._hook, part 2: the co-execution fast path of one DL op.
 *
 * In co-execution a DL op does not run: Python checks it against the next event of the
 * recorded path and gets a placeholder back.  That check runs for every op of every
 * iteration, so its common case is here, in C.  It makes no decision of its own: the
 * runtime (runtime/guards.py, fast_spec) records for each plain op event a ``fast`` spec
 *
 *     (callee, number of positional args, per-arg specs, output id, output aval,
 *      keyword names or None)
 *
 * (an output id of None: the op's one output is a static value, given as the "aval": a
 * placement a placeholder's ``x.sharding`` answers with one device)
 *
 * (the arguments: the positional ones, then the keyword ones in call order) with per-arg specs (0, id) a placeholder of this iteration, (1, value) a static value,
 * (2, id, aval, type) a fed Python number, NumPy scalar or array, (3, value) a tuple of
 * static values (compared element by element, types included).  Anything else (other
 * keyword names, several outputs, closures, NumPy arrays, a failed check) returns the MISS sentinel and the
 * runtime's general path decides, re-checking from scratch.  Objects are read through the
 * slot offsets of the runtime's own classes (Iteration, Path, OpEvent and Placeholder
 * declare __slots__), which set_fast_path() looks up when the runtime is imported.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include "_fastop.h"

/* This thread's open Iteration, or NULL: the only place it is stored (the runtime's
 * context.current() reads it through current_iteration()). */
static THREAD_LOCAL PyObject *current = NULL;
static unsigned long long fast_skipped = 0, fast_feeds = 0;

static struct {
    int ready;
    PyTypeObject *placeholder, *event, *iteration, *path, *array, *numpy_scalar;
    PyObject *stand_in, *coexec, *miss, *aval_name;
    Py_ssize_t ph_trace, ph_aval, ph_it, ph_id, ph_rec, ph_val;
    Py_ssize_t ev_fast;
    Py_ssize_t it_mode, it_opaque_depth, it_path, it_pos, it_env, it_live;
    Py_ssize_t path_events;
} F;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))
#define MAX_ARGS 16

PyObject *
terra_current_iteration(void)
{
    return current;
}

/* A new placeholder of iteration `it` for value `id` (appended to it.live). */
static PyObject *
new_placeholder(PyObject *it, PyObject *id, PyObject *aval, PyObject *live)
{
    PyObject *ph = F.placeholder->tp_alloc(F.placeholder, 0);
    if (ph == NULL)
        return NULL;
    SLOT(ph, F.ph_trace) = Py_NewRef(F.stand_in);
    SLOT(ph, F.ph_aval) = Py_NewRef(aval);
    SLOT(ph, F.ph_it) = Py_NewRef(it);
    SLOT(ph, F.ph_id) = Py_NewRef(id);
    SLOT(ph, F.ph_rec) = Py_NewRef(Py_None);
    SLOT(ph, F.ph_val) = Py_NewRef(Py_None);
    if (PyList_Append(live, ph) < 0) {
        Py_DECREF(ph);
        return NULL;
    }
    return ph;
}

/* Is `it` still where terra_fast_op found it (co-executing `path` at event `pos`, outside
 * any opaque op)?  Comparing statics and avals may run Python code (a user's __eq__), which
 * may itself run ops of the iteration. */
static int
still_at(PyObject *it, PyObject *path, Py_ssize_t pos)
{
    PyObject *depth = SLOT(it, F.it_opaque_depth), *pos_obj = SLOT(it, F.it_pos);
    return SLOT(it, F.it_mode) == F.coexec && SLOT(it, F.it_path) == path
        && depth != NULL && PyLong_CheckExact(depth) && !PyObject_IsTrue(depth)
        && pos_obj != NULL && PyLong_CheckExact(pos_obj) && PyLong_AsSsize_t(pos_obj) == pos;
}

/* Is x the static value `want`, or equal to it with the same types all through?  `want`
 * is a plain tuple (guards.fast_spec made it: of ints, floats, bools, strings, None,
 * Ellipsis, slices and such tuples), so its comparisons run no code of the program's.
 * Mirrors the general path, which flattens the tuple and compares each leaf (values.same).
 * 1 yes, 0 no (an error is cleared), -1 an interrupt came (it is left set). */
static int
same_statics(PyObject *x, PyObject *want)
{
    if (x == want)
        return 1;
    if (Py_TYPE(x) != Py_TYPE(want))
        return 0;
    if (PyTuple_CheckExact(want)) {
        Py_ssize_t n = PyTuple_GET_SIZE(want);
        if (PyTuple_GET_SIZE(x) != n)
            return 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int same = same_statics(PyTuple_GET_ITEM(x, i), PyTuple_GET_ITEM(want, i));
            if (same != 1)
                return same;
        }
        return 1;
    }
    int same = PyObject_RichCompareBool(x, want, Py_EQ);
    if (same < 0)
        return terra_interrupted() ? -1 : 0;
    return same;
}

/* Does argument x match its per-arg spec?  1 yes (a feed: *value is what to bind), 0 no
 * (a pending Python error is cleared), -1 an interrupt came (it is left set: the op's call
 * raises it), and *ran_python tells whether Python code ran. */
static int
match_arg(PyObject *it, PyObject *x, PyObject *spec, PyObject **value, int *ran_python)
{
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    PyTypeObject *t = Py_TYPE(x);
    *value = NULL;
    if (kind == 0) {  /* this iteration's placeholder, not yet settled */
        if (t != F.placeholder || SLOT(x, F.ph_it) != it || SLOT(x, F.ph_val) != Py_None)
            return 0;
        PyObject *id = SLOT(x, F.ph_id), *want = PyTuple_GET_ITEM(spec, 1);
        /* (ids are ints: comparing them runs no Python code) */
        return id == want || (id != NULL && PyObject_RichCompareBool(id, want, Py_EQ) == 1);
    }
    if (kind == 1) {  /* a static value: the same object, or an equal one of its type */
        PyObject *want = PyTuple_GET_ITEM(spec, 1);
        if (x == want)
            return 1;
        if (t != Py_TYPE(want))
            return 0;
        *ran_python = 1;
        PyObject *eq = PyObject_RichCompare(x, want, Py_EQ);
        int same = eq != NULL ? PyObject_IsTrue(eq) : -1;
        Py_XDECREF(eq);
        if (same < 0 && terra_interrupted())
            return -1;  /* (an interrupt in __eq__: the op's call raises it) */
        return same == 1;
    }
    if (kind == 3) {  /* a tuple of static values (an axis tuple, an index, strides) */
        /* (-1: an interrupt in a comparison: the op's call raises it; an element of x may
         * be the program's object, a slice's bound, whose __eq__ is its code) */
        *ran_python = 1;
        return same_statics(x, PyTuple_GET_ITEM(spec, 1));
    }
    /* a feed: a Python number of the recorded type, or an array of the recorded aval */
    if (t == &PyLong_Type || t == &PyFloat_Type) {
        *value = x;
        return (PyObject *)t == PyTuple_GET_ITEM(spec, 3);
    }
    /* A NumPy scalar (np.float32(0.5), np.sqrt(64.0)): immutable, bound as it is (the
     * launch transfers it, as coexecution.bind keeps it); of the recorded type, its aval is
     * the recorded one (the path's configuration, x64 included, is guarded at its enter). */
    if (PyType_IsSubtype(t, F.numpy_scalar)) {
        *value = x;
        return (PyObject *)t == PyTuple_GET_ITEM(spec, 3);
    }
    PyObject *aval;
    if (t == F.array)
        aval = PyObject_GetAttr(x, F.aval_name);
    else if (t == F.placeholder && SLOT(x, F.ph_val) != Py_None && SLOT(x, F.ph_val) != NULL)
        aval = Py_XNewRef(SLOT(x, F.ph_aval));
    else
        return 0;  /* NumPy arrays and the rest: the general path */
    PyObject *want = PyTuple_GET_ITEM(spec, 2);
    int same = -1;
    if (aval != NULL) {
        if (aval != want)
            *ran_python = 1;
        same = aval == want ? 1 : PyObject_RichCompareBool(aval, want, Py_EQ);
        Py_DECREF(aval);
    }
    if (same < 0 && terra_interrupted())
        return -1;
    *value = t == F.placeholder ? SLOT(x, F.ph_val) : x;
    return same == 1;
}

/* The placeholder for a skipped op, or a new reference to MISS; NULL with an error set. */
PyObject *
terra_fast_op(PyObject *it, PyObject *fn, PyObject *const *args, Py_ssize_t nargs,
              PyObject *kwnames)
{
    Py_ssize_t total = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    if (!F.ready || Py_TYPE(it) != F.iteration || total > MAX_ARGS)
        return Py_NewRef(F.miss);
    PyObject *path = SLOT(it, F.it_path), *pos_obj = SLOT(it, F.it_pos);
    PyObject *env = SLOT(it, F.it_env), *live = SLOT(it, F.it_live);
    if (path == NULL || Py_TYPE(path) != F.path || pos_obj == NULL || !PyLong_CheckExact(pos_obj)
        || env == NULL || !PyDict_CheckExact(env) || live == NULL || !PyList_CheckExact(live))
        return Py_NewRef(F.miss);
    Py_ssize_t pos = PyLong_AsSsize_t(pos_obj);
    if (!still_at(it, path, pos))
        return Py_NewRef(F.miss);
    PyObject *events = SLOT(path, F.path_events);
    if (events == NULL || !PyList_CheckExact(events) || pos < 0 || pos >= PyList_GET_SIZE(events))
        return Py_NewRef(F.miss);
    PyObject *ev = PyList_GET_ITEM(events, pos);
    if (Py_TYPE(ev) != F.event)
        return Py_NewRef(F.miss);
    PyObject *fast = SLOT(ev, F.ev_fast);
    if (fast == NULL || fast == Py_None || PyTuple_GET_ITEM(fast, 0) != fn
        || PyLong_AsSsize_t(PyTuple_GET_ITEM(fast, 1)) != nargs)
        return Py_NewRef(F.miss);
    PyObject *names = PyTuple_GET_ITEM(fast, 5);  /* the recorded keyword names, or None */
    if (kwnames == NULL ? names != Py_None
            : names == Py_None || PyTuple_GET_SIZE(names) != PyTuple_GET_SIZE(kwnames))
        return Py_NewRef(F.miss);
    for (Py_ssize_t i = 0; kwnames != NULL && i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *a = PyTuple_GET_ITEM(kwnames, i), *b = PyTuple_GET_ITEM(names, i);
        if (a != b && PyUnicode_Compare(a, b) != 0) {
            PyErr_Clear();
            return Py_NewRef(F.miss);
        }
    }
    /* Held while Python code may run (see still_at); the feeds' values are held by args. */
    Py_INCREF(path);
    Py_INCREF(fast);
    Py_INCREF(env);
    Py_INCREF(live);
    PyObject *result = NULL, *specs = PyTuple_GET_ITEM(fast, 2);
    PyObject *feed_ids[MAX_ARGS], *feed_values[MAX_ARGS];
    int feeds = 0, ran_python = 0;
    for (Py_ssize_t i = 0; i < total; i++) {
        PyObject *spec = PyTuple_GET_ITEM(specs, i), *value;
        int matched = match_arg(it, args[i], spec, &value, &ran_python);
        if (matched < 0)
            goto done;  /* (nothing changed yet: the iteration is as it was) */
        if (!matched)
            goto miss;
        if (value != NULL) {
            feed_ids[feeds] = PyTuple_GET_ITEM(spec, 1);
            feed_values[feeds++] = value;
        }
    }
    if (ran_python && !still_at(it, path, pos))
        goto miss;
    /* The op is skipped: bind its feeds, move on, hand Python the output's placeholder. */
    PyObject *next = PyLong_FromSsize_t(pos + 1);
    if (next == NULL)
        goto done;
    for (int i = 0; i < feeds; i++)
        if (PyDict_SetItem(env, feed_ids[i], feed_values[i]) < 0) {
            Py_DECREF(next);
            goto done;
        }
    /* (an output id of None: the op's recorded static value, as the general path gives it) */
    result = PyTuple_GET_ITEM(fast, 3) == Py_None ? Py_NewRef(PyTuple_GET_ITEM(fast, 4))
        : new_placeholder(it, PyTuple_GET_ITEM(fast, 3), PyTuple_GET_ITEM(fast, 4), live);
    if (result == NULL) {
        Py_DECREF(next);
        goto done;
    }
    Py_SETREF(SLOT(it, F.it_pos), next);
    fast_skipped++;
    fast_feeds += (unsigned long long)feeds;
    goto done;
miss:
    result = Py_NewRef(F.miss);
done:
    Py_DECREF(path);
    Py_DECREF(fast);
    Py_DECREF(env);
    Py_DECREF(live);
    return result;
}

/* ------------------------------------------------------------------ Python-facing */

static Py_ssize_t
slot_offset(PyObject *cls, const char *name)
{
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL)
        return -1;
    Py_ssize_t off = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)
        && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX)
        off = ((PyMemberDescrObject *)d)->d_member->offset;
    else
        PyErr_Format(PyExc_TypeError, "%R.%s is not an object slot", cls, name);
    Py_DECREF(d);
    return off;
}

static int
get_type(PyObject *config, const char *key, PyTypeObject **out)
{
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL || !PyType_Check(v)) {
        PyErr_Format(PyExc_TypeError, "set_fast_path: %s must be a class", key);
        return -1;
    }
    Py_XSETREF(*out, (PyTypeObject *)Py_NewRef(v));
    return 0;
}

static int
get_object(PyObject *config, const char *key, PyObject **out)
{
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "set_fast_path: no %s", key);
        return -1;
    }
    Py_XSETREF(*out, Py_NewRef(v));
    return 0;
}

/* set_fast_path({"placeholder": ..., "event": ..., "iteration": ..., "path": ...,
 * "array": ..., "numpy_scalar": ..., "stand_in": ..., "coexec": ..., "miss": ...}) */
static PyObject *
set_fast_path(PyObject *mod, PyObject *config)
{
    if (!PyDict_Check(config)) {
        PyErr_SetString(PyExc_TypeError, "set_fast_path takes a dict");
        return NULL;
    }
    F.ready = 0;  /* (again if the runtime module is reloaded: its classes are new) */
    if (get_type(config, "placeholder", &F.placeholder) < 0 || get_type(config, "event", &F.event) < 0
        || get_type(config, "iteration", &F.iteration) < 0 || get_type(config, "path", &F.path) < 0
        || get_type(config, "array", &F.array) < 0 || get_type(config, "numpy_scalar", &F.numpy_scalar) < 0
        || get_object(config, "stand_in", &F.stand_in) < 0
        || get_object(config, "coexec", &F.coexec) < 0 || get_object(config, "miss", &F.miss) < 0)
        return NULL;
    PyObject *ph = (PyObject *)F.placeholder, *it = (PyObject *)F.iteration;
    if ((F.ph_trace = slot_offset(ph, "_trace")) < 0 || (F.ph_aval = slot_offset(ph, "aval")) < 0
        || (F.ph_it = slot_offset(ph, "_it")) < 0 || (F.ph_id = slot_offset(ph, "_id")) < 0
        || (F.ph_rec = slot_offset(ph, "_rec")) < 0 || (F.ph_val = slot_offset(ph, "_val")) < 0
        || (F.ev_fast = slot_offset((PyObject *)F.event, "fast")) < 0
        || (F.it_mode = slot_offset(it, "mode")) < 0
        || (F.it_opaque_depth = slot_offset(it, "opaque_depth")) < 0
        || (F.it_path = slot_offset(it, "path")) < 0 || (F.it_pos = slot_offset(it, "pos")) < 0
        || (F.it_env = slot_offset(it, "env")) < 0 || (F.it_live = slot_offset(it, "live")) < 0
        || (F.path_events = slot_offset((PyObject *)F.path, "events")) < 0)
        return NULL;
    if (F.aval_name == NULL && (F.aval_name = PyUnicode_InternFromString("aval")) == NULL)
        return NULL;
    F.ready = 1;
    Py_RETURN_NONE;
}

/* fast_op(iteration, fn, args_tuple[, kwargs_dict]) -> placeholder or MISS */
static PyObject *
fast_op(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs > 4 || !PyTuple_CheckExact(args[2])
        || (nargs == 4 && !PyDict_CheckExact(args[3]))) {
        PyErr_SetString(PyExc_TypeError, "fast_op(iteration, fn, args_tuple[, kwargs_dict])");
        return NULL;
    }
    PyObject *positional = args[2], *kwargs = nargs == 4 ? args[3] : NULL;
    Py_ssize_t npos = PyTuple_GET_SIZE(positional);
    if (kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0)
        return terra_fast_op(args[0], args[1], &PyTuple_GET_ITEM(positional, 0), npos, NULL);
    /* A call's vector: the positional values, then the keyword values in call order. */
    Py_ssize_t nkw = PyDict_GET_SIZE(kwargs);
    if (npos + nkw > MAX_ARGS)
        return Py_NewRef(F.miss);
    PyObject *stack[MAX_ARGS], *kwnames = PyTuple_New(nkw), *key, *value;
    if (kwnames == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < npos; i++)
        stack[i] = PyTuple_GET_ITEM(positional, i);
    Py_ssize_t pos = 0, i = 0;
    while (PyDict_Next(kwargs, &pos, &key, &value)) {
        PyTuple_SET_ITEM(kwnames, i, Py_NewRef(key));
        stack[npos + i++] = value;
    }
    PyObject *r = terra_fast_op(args[0], args[1], stack, npos, kwnames);
    Py_DECREF(kwnames);
    return r;
}

/* placeholder(iteration, id, aval): Iteration._new's common case */
static PyObject *
placeholder(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !F.ready || Py_TYPE(args[0]) != F.iteration) {
        PyErr_SetString(PyExc_TypeError, "placeholder(iteration, id, aval)");
        return NULL;
    }
    PyObject *live = SLOT(args[0], F.it_live);
    if (live == NULL || !PyList_CheckExact(live)) {
        PyErr_SetString(PyExc_TypeError, "placeholder: the iteration has no live list");
        return NULL;
    }
    return new_placeholder(args[0], args[1], args[2], live);
}

PyObject *
terra_set_iteration(PyObject *it)
{
    PyObject *was = current;
    current = it == NULL || it == Py_None ? NULL : Py_NewRef(it);
    return was;  /* (a new reference, or NULL where none was open) */
}

static PyObject *
set_iteration(PyObject *mod, PyObject *it)
{
    PyObject *was = terra_set_iteration(it);
    return was != NULL ? was : Py_NewRef(Py_None);  /* hands the reference over */
}

static PyObject *
current_iteration(PyObject *mod, PyObject *unused)
{
    return Py_NewRef(current != NULL ? current : Py_None);
}

static PyObject *
fast_counters(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("(KK)", fast_skipped, fast_feeds);
}

int
terra_fast_is_miss(PyObject *result)
{
    return result == F.miss;
}

void
terra_fast_reset(void)
{
    fast_skipped = fast_feeds = 0;
}

/* ------------------------------------------------------------------ OpMethod
 * A placeholder's operator (__add__, __rmatmul__, __getitem__, ...): the fast path first,
 * else the runtime's general method.  A method descriptor, so CPython's operator slots call
 * it with self as the first argument, without making a bound method. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;        /* the op recorded for it (operator.add, ...) */
    PyObject *general;   /* general(self, *args): the runtime's path */
} OpMethodObject;

static PyObject *
opmethod_vectorcall(OpMethodObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (current != NULL && kwnames == NULL && nargs >= 1) {
        PyObject *r = terra_fast_op(current, self->fn, args, nargs, NULL);
        if (r != F.miss)
            return r;
        Py_DECREF(r);
    }
    return PyObject_Vectorcall(self->general, args, nargsf, kwnames);
}

static PyObject *
opmethod_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fn, *general;
    if (!PyArg_ParseTuple(args, "OO:OpMethod", &fn, &general))
        return NULL;
    OpMethodObject *self = (OpMethodObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)opmethod_vectorcall;
    self->fn = Py_NewRef(fn);
    self->general = Py_NewRef(general);
    return (PyObject *)self;
}

static PyObject *
opmethod_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int
opmethod_traverse(OpMethodObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fn);
    Py_VISIT(self->general);
    return 0;
}

static void
opmethod_dealloc(OpMethodObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_XDECREF(self->fn);
    Py_XDECREF(self->general);
    Py_TYPE(self)->tp_free(self);
}

static PyMemberDef opmethod_members[] = {
    {"fn", T_OBJECT, offsetof(OpMethodObject, fn), READONLY, "the op recorded for this operator"},
    {"general", T_OBJECT, offsetof(OpMethodObject, general), READONLY, "the runtime's path"},
    {NULL},
};

static PyTypeObject OpMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.OpMethod",
    .tp_basicsize = sizeof(OpMethodObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(OpMethodObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = opmethod_get,
    .tp_new = opmethod_new,
    .tp_dealloc = (destructor)opmethod_dealloc,
    .tp_traverse = (traverseproc)opmethod_traverse,
    .tp_members = opmethod_members,
    .tp_doc = "OpMethod(fn, general): a placeholder operator; the co-execution fast path, else general(self, *args).",
};

PyMethodDef terra_fast_methods[] = {
    {"set_fast_path", set_fast_path, METH_O, "Tell the fast path the runtime's classes."},
    {"fast_op", (PyCFunction)(void (*)(void))fast_op, METH_FASTCALL,
     "fast_op(iteration, fn, args[, kwargs]): the skipped op's placeholder, or the MISS sentinel."},
    {"placeholder", (PyCFunction)(void (*)(void))placeholder, METH_FASTCALL,
     "placeholder(iteration, id, aval): a new placeholder of the iteration (kept in its live list)."},
    {"set_iteration", set_iteration, METH_O,
     "Make it this thread's open iteration (None: none); returns the previous one."},
    {"current_iteration", current_iteration, METH_NOARGS,
     "This thread's open iteration, or None."},
    {"fast_counters", fast_counters, METH_NOARGS, "(ops skipped, feeds) on the fast path."},
    {NULL},
};

int
terra_fast_init(PyObject *m)
{
    if (PyType_Ready(&OpMethodType) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "OpMethod", (PyObject *)&OpMethodType);
}
