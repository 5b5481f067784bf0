/* terra_bc._hook: the PEP 523 frame hook and the call-site dispatcher.
 *
 * Kept as small as it can be: decisions are made in Python, with one exception kept here
 * because it runs at every loop turn: a turn without a DL-op call is not reported, and a
 * `for` loop that ran to its end (three turns or more) without any is plain Python and is
 * never watched again (loopiter_next).  The
 * hook asks a Python callback once per code object whether to run other code in its
 * place, caches the answer in a code extra, and runs that code by swapping it into the
 * frame before evaluation.
 * A Site is the constant that rewritten call sites call: it counts and forwards the call
 * with no Python frame of its own, so tracebacks, inspect.stack() and zero-argument
 * super() see exactly the frames they would see without terra_bc.
 */
#define PY_SSIZE_T_CLEAN
#define Py_BUILD_CORE
#include <Python.h>
#include <structmember.h>
#include <internal/pycore_frame.h>
#include <internal/pycore_pystate.h> /* _Py_IsMainThread */
#if PY_VERSION_HEX >= 0x030c0000
#include <internal/pycore_interp.h> /* the interpreter's sys.monitoring events */
#endif
#include <pthread.h>
#include "_fastop.h"

#if PY_VERSION_HEX < 0x030b0000 || PY_VERSION_HEX >= 0x030e0000
#error "terra_bc._hook supports CPython 3.11 to 3.13"
#endif

#if PY_VERSION_HEX >= 0x030d0000
#define FRAME_CODE(f) ((PyCodeObject *)(f)->f_executable)
#define SET_FRAME_CODE(f, co) ((f)->f_executable = (PyObject *)(co))
#define RESET_IP(f, co) ((f)->instr_ptr = _PyCode_CODE(co))
#else
#define FRAME_CODE(f) ((f)->f_code)
#define SET_FRAME_CODE(f, co) ((f)->f_code = (co))
#define RESET_IP(f, co) ((f)->prev_instr = _PyCode_CODE(co) - 1)
#endif

#if PY_VERSION_HEX >= 0x030c0000
#define CODE_GET_EXTRA PyUnstable_Code_GetExtra
#define CODE_SET_EXTRA PyUnstable_Code_SetExtra
#define REQUEST_EXTRA_INDEX PyUnstable_Eval_RequestCodeExtraIndex
#else
#define CODE_GET_EXTRA _PyCode_GetExtra
#define CODE_SET_EXTRA _PyCode_SetExtra
#define REQUEST_EXTRA_INDEX _PyEval_RequestCodeExtraIndex
#endif

/* The layout CPython 3.11-3.13 give code->co_extra (codeobject.c, not in any header). */
typedef struct {
    Py_ssize_t ce_size;
    void *ce_extras[1];
} CodeExtras;

/* Generators are rewritten: their code is swapped at the call that creates them, before
 * RETURN_GENERATOR copies the frame; a resumed frame is owned by its generator (skipped
 * below).  Coroutines and async generators stay as they are. */
#define UNTOUCHABLE (CO_COROUTINE | CO_ASYNC_GENERATOR | CO_ITERABLE_COROUTINE)

static Py_ssize_t extra_index = -1;
static PyObject *callback = NULL;          /* code -> replacement code or None */
static _PyFrameEvalFunction previous = NULL;
/* Enabling is per thread: a thread chose on (enable_thread), off (disable_thread), or never
 * chose and follows the process-wide default (set_default: on under python -m terra_bc, so
 * threads the program starts run rewritten code too).  The hook is installed while some
 * thread chose on or the default is on. */
enum { FOLLOWS_DEFAULT = 0, CHOSE_ON = 1, CHOSE_OFF = 2 };
static int enabled_threads = 0;            /* threads that chose on */
static int default_enabled = 0;            /* what threads that never chose follow */
static THREAD_LOCAL int thread_choice = FOLLOWS_DEFAULT;
#define THREAD_ENABLED() \
    (thread_choice == CHOSE_ON || (thread_choice == FOLLOWS_DEFAULT && default_enabled))
static THREAD_LOCAL int in_callback = 0;
static unsigned long long sites_executed = 0;
static unsigned long long frames_swapped = 0;

/* ------------------------------------------------------------------ Site */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *key;
    unsigned long long count;
    int unpacking; /* called as site(callee, args[, kwargs]) for f(*args, **kwargs) */
    PyObject *seen_key; /* the last callee's key and whether it is a DL op (a one-entry cache) */
    int seen_dl;
    int offered;        /* routed once for the runtime to see its function (function units) */
    unsigned long long dl_count; /* calls whose callee was a DL op (routed or not) */
} SiteObject;

/* The runtime's attach point: inside a unit iteration (per thread), calls of DL ops go to
 * handler(site, callee, *args, **kwargs) instead of the callee.  classify(callee) -> bool
 * decides what a DL op is, once per site for each new callee key. */
static PyObject *route_handler = NULL;
static PyObject *route_classify = NULL;
static THREAD_LOCAL int routing = 0;
/* Also outside iterations: set by the runtime once an iteration has ended, and kept, since
 * a placeholder that escaped may reach any later DL-op call (runtime/context.py). */
static int route_always = 0;
static PyObject *loop_handler = NULL;   /* runtime/discovery.py on_loop(mark, token, exiting) */
static PyObject *call_handler = NULL;   /* runtime/discovery.py on_call(mark, token, state) */
static PyObject *watch_handler = NULL;  /* runtime/tools.py on_watched() -> still routed? */
static Py_ssize_t mark_index = -1;      /* code extra: a rewritten code's unit mark (or NULL) */
static THREAD_LOCAL unsigned long long dl_calls = 0; /* DL-op calls through sites */

static PyTypeObject *partial_type = NULL; /* functools.partial (set at import) */
static PyObject *str_func = NULL;

/* What identifies a callee for classification, held by the site's one-entry cache: a
 * function's code (closures of one code are one kind of callee), a bound method's function,
 * a module-level builtin itself, what a functools.partial wraps (flax calls
 * ``partial(jnp.einsum, precision=...)``: keyed by its type, every partial at a site would
 * share one verdict), otherwise the callee's type.  Never the callee object itself: the
 * cache would keep it (a class, a closure and all it holds) alive. */
static PyObject *
callee_key(PyObject *callee)
{
    if (partial_type != NULL && Py_IS_TYPE(callee, partial_type)) {
        PyObject *func = PyObject_GetAttr(callee, str_func);
        if (func == NULL) {
            PyErr_Clear();
            return (PyObject *)partial_type;
        }
        PyObject *key = callee_key(func); /* (borrowed: the partial holds func, func its key) */
        Py_DECREF(func);
        return key;
    }
    if (PyMethod_Check(callee))
        callee = PyMethod_GET_FUNCTION(callee);
    if (PyFunction_Check(callee))
        return PyFunction_GET_CODE(callee);
    if (PyCFunction_Check(callee)) {
        PyObject *self = PyCFunction_GET_SELF(callee);
        if (self == NULL || PyModule_Check(self))
            return callee;
    }
    return (PyObject *)Py_TYPE(callee);
}

/* ------------------------------------------------------------------ tools watching
 *
 * A tool watches a thread while a trace or profile function is set in it (sys.settrace,
 * sys.setprofile: pdb, coverage's C tracer, profile) or, on 3.12+, while a sys.monitoring
 * tool has events on, for every code object or for this one (cProfile, coverage's sysmon
 * core).  sys.settrace and sys.setprofile are monitoring tools 6 and 7 there, switched on
 * for the whole interpreter by one thread: they are read from the thread state instead.
 * While a tool watches, terra_bc stays out of sight: frames begin with their original code,
 * sites are plain calls, and the runtime's own Python, when it must run, is not seen.  What
 * an iteration open at that moment does is the runtime's decision (runtime/tools.py). */
#if PY_VERSION_HEX >= 0x030c0000
#define MONITORING_TOOLS 0x3F /* tool ids 0-5: not sys.setprofile's (6) or sys.settrace's (7) */
static inline int
monitored(PyThreadState *ts, PyCodeObject *code)
{
    const uint8_t *tools = ts->interp->monitors.tools;
    uint8_t any = 0;
    for (int i = 0; i < _PY_MONITORING_UNGROUPED_EVENTS; i++)
        any |= tools[i];
    if (code != NULL && code->_co_monitoring != NULL) {
        tools = code->_co_monitoring->local_monitors.tools;
        for (int i = 0; i < _PY_MONITORING_LOCAL_EVENTS; i++)
            any |= tools[i];
    }
    return (any & MONITORING_TOOLS) != 0;
}
#else
#define monitored(ts, code) 0
#endif

/* Is a tool watching this thread (and `code`, when given)? */
static inline int
watched(PyThreadState *ts, PyCodeObject *code)
{
    return ts->c_tracefunc != NULL || ts->c_profilefunc != NULL || monitored(ts, code);
}

/* Out of a tool's sight: CPython calls no trace, profile or monitoring function while
 * tstate->tracing is set, as while it runs one.  `hiding` counts ours, so that code a tool
 * runs itself (its callback, a debugger's commands) is told apart (in_tool). */
static THREAD_LOCAL int hiding = 0;

static inline void
hide_begin(PyThreadState *ts)
{
    hiding++;
    PyThreadState_EnterTracing(ts);
}

static inline void
hide_end(PyThreadState *ts)
{
    PyThreadState_LeaveTracing(ts);
    hiding--;
}

/* Is this thread running a tool's own code (a trace function, pdb evaluating `p x`)? */
static inline int
in_tool(PyThreadState *ts)
{
    return ts->tracing > hiding;
}

/* ------------------------------------------------------------------ Unseen
 * Unseen(fn) calls fn out of a watching tool's sight (see watched above).  A placeholder
 * that outlived its iteration (a value carried from turn to turn, a parameter after the
 * loop) runs terra_bc's own Python for its operators, methods and conversions: a debugger
 * must not step into it, nor a profiler or coverage tool count it.  A method descriptor,
 * so it stands for a method (bound to the placeholder) or a property's getter. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
} UnseenObject;

static PyObject *
unseen_vectorcall(UnseenObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyThreadState *ts = PyThreadState_GET();
    if (!watched(ts, NULL))
        return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    hide_begin(ts);
    PyObject *r = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    hide_end(ts);
    return r;
}

static PyObject *
unseen_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "O:Unseen", &fn))
        return NULL;
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "Unseen(fn) takes a callable");
        return NULL;
    }
    UnseenObject *self = (UnseenObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)unseen_vectorcall;
    self->fn = Py_NewRef(fn);
    return (PyObject *)self;
}

static PyObject *
unseen_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int
unseen_traverse(UnseenObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fn);
    return 0;
}

static void
unseen_dealloc(UnseenObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_XDECREF(self->fn);
    Py_TYPE(self)->tp_free(self);
}

static PyMemberDef unseen_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(UnseenObject, fn), READONLY, "the function called"},
    {NULL},
};

/* The function's own __name__, __qualname__, __doc__, __module__ (pytest's assertion
 * messages, inspect, help() read them from a bound method's function); and any other
 * attribute the function has. */
static PyObject *
unseen_forward(UnseenObject *self, void *name)
{
    return PyObject_GetAttrString(self->fn, (const char *)name);
}

static PyGetSetDef unseen_getset[] = {
    {"__name__", (getter)unseen_forward, NULL, NULL, "__name__"},
    {"__qualname__", (getter)unseen_forward, NULL, NULL, "__qualname__"},
    {"__doc__", (getter)unseen_forward, NULL, NULL, "__doc__"},
    {"__module__", (getter)unseen_forward, NULL, NULL, "__module__"},
    {NULL},
};

static PyObject *
unseen_getattro(UnseenObject *self, PyObject *name)
{
    PyObject *r = PyObject_GenericGetAttr((PyObject *)self, name);
    if (r != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return r;
    PyErr_Clear();
    return PyObject_GetAttr(self->fn, name);
}

static PyTypeObject UnseenType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.Unseen",
    .tp_basicsize = sizeof(UnseenObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(UnseenObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = unseen_get,
    .tp_new = unseen_new,
    .tp_dealloc = (destructor)unseen_dealloc,
    .tp_traverse = (traverseproc)unseen_traverse,
    .tp_members = unseen_members,
    .tp_getset = unseen_getset,
    .tp_getattro = (getattrofunc)unseen_getattro,
    .tp_doc = "Unseen(fn): calls fn (a method too) out of the sight of a debugger, profiler or coverage tool.",
};

/* A pending call (report_error): raise `exc` (stolen) where the main thread runs. */
static int
raise_pending(void *exc)
{
    PyErr_SetObject((PyObject *)Py_TYPE((PyObject *)exc), (PyObject *)exc);
    Py_DECREF((PyObject *)exc);
    return -1;
}

/* The error set now, met where it cannot be raised (a handler's failure, a loop's iterator
 * being freed).  An asynchronous one (not an Exception: the KeyboardInterrupt a signal
 * handler raised while the runtime ran) is the program's: raised in the main thread as soon
 * as its Python runs again, as a signal's own handler would run (a pending call), never
 * lost: defer_interrupt, 1 if it was.  Anything else is reported as unraisable by
 * report_error (`obj`: what failed). */
static int
defer_interrupt(void)
{
    PyObject *type, *val, *tb;
    PyErr_Fetch(&type, &val, &tb);
    PyErr_NormalizeException(&type, &val, &tb);
    if (val != NULL && !PyErr_GivenExceptionMatches(type, PyExc_Exception) && _Py_IsMainThread()) {
        if (tb != NULL)
            PyException_SetTraceback(val, tb);
        if (Py_AddPendingCall(raise_pending, val) == 0) {  /* (it owns val now) */
            Py_XDECREF(type);
            Py_XDECREF(tb);
            return 1;
        }
    }
    PyErr_Restore(type, val, tb);
    return 0;
}

static void
report_error(PyObject *obj)
{
    if (!defer_interrupt())
        PyErr_WriteUnraisable(obj);
}

/* The error set now came from Python that C called where it goes on as if the answer were
 * no (a comparison in the fast path, classifying a callee, deciding about a code object).
 * 1, the error left set, if it is an interrupt (not an Exception: the KeyboardInterrupt a
 * signal handler raised meanwhile): the program gets it where it called, as it would have
 * at that call without terra_bc.  Else the error is dropped: 0. */
int
terra_interrupted(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return 1;
    PyErr_Clear();
    return 0;
}

/* handler(*args) for the loop, call and watch handlers: never seen by a tool, and a
 * failure is reported (report_error: it must not become the user's exception where it is
 * terra_bc's own).  Steals args (NULL: building them failed).
 *
 * An interrupt can come as the handler begins (its first instruction runs the signal's
 * handler), before it did anything: the handler then cannot have left a turn or an
 * iteration consistent, so it is run once more, and the interrupt is handed to the caller
 * in *interrupt (a new reference), which raises it where the program can get it.  (Once
 * begun, the handlers catch an interrupt themselves: discovery.on_loop returns it.) */
static PyObject *
call_quietly_taking(PyObject *handler, PyObject *args, PyObject **interrupt)
{
    PyObject *r = NULL;
    *interrupt = NULL;
    if (args != NULL) {
        PyThreadState *ts = PyThreadState_GET();
        int hidden = watched(ts, NULL);
        if (hidden)
            hide_begin(ts);
        r = PyObject_Call(handler, args, NULL);
        if (r == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            PyObject *type, *tb;
            PyErr_Fetch(&type, interrupt, &tb);
            PyErr_NormalizeException(&type, interrupt, &tb);
            if (tb != NULL && *interrupt != NULL)
                PyException_SetTraceback(*interrupt, tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            r = PyObject_Call(handler, args, NULL);
        }
        if (hidden)
            hide_end(ts);
        Py_DECREF(args);
    }
    if (r == NULL)
        report_error(handler);
    return r;
}

/* The interrupt call_quietly_taking handed over, where the program cannot get it now (a
 * loop's iterator being freed, another exception unwinding): raised as soon as the main
 * thread's Python runs again (report_error).  Steals it. */
static void
raise_later(PyObject *interrupt)
{
    if (interrupt != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(interrupt), interrupt);
        Py_DECREF(interrupt);
        report_error(loop_handler);
    }
}

static PyObject *
call_quietly(PyObject *handler, PyObject *args)
{
    PyObject *interrupt;
    PyObject *r = call_quietly_taking(handler, args, &interrupt);
    raise_later(interrupt);
    return r;
}

/* Routed calls in progress in this thread (the runtime is running an op, a transform). */
static THREAD_LOCAL int routed_calls = 0;

/* A tool watches this thread: while its iteration still routes DL-op calls, the runtime
 * decides what the iteration does (runtime/tools.py; it stops routing them, or goes on
 * where it must).  1: this call is still routed (unseen by the tool), 0: a plain call. */
static int
routed_while_watched(void)
{
    if (!routing || watch_handler == NULL)
        return 0;
    PyObject *r = call_quietly(watch_handler, Py_BuildValue("(i)", routed_calls > 0));
    int still = r != NULL && PyObject_IsTrue(r) > 0;
    Py_XDECREF(r);
    return still;
}

/* 1: route this call to the handler, 0: call the callee, -1: error.  `hide`: a tool
 * watches this thread (what the runtime runs here is kept out of its sight). */
static int
should_route(SiteObject *self, PyObject *callee, int hide)
{
    if (route_handler == NULL
        || !(routing || route_always || loop_handler != NULL || call_handler != NULL)
        || (hide && (in_tool(PyThreadState_GET()) || !routed_while_watched())))
        return 0;
    PyObject *key = callee_key(callee);
    if (key != self->seen_key) {
        if (hide)
            hide_begin(PyThreadState_GET());
        PyObject *verdict = PyObject_CallOneArg(route_classify, callee);
        if (hide)
            hide_end(PyThreadState_GET());
        int dl = verdict == NULL ? -1 : PyObject_IsTrue(verdict);
        Py_XDECREF(verdict);
        if (dl < 0) {
            /* classify never raises by design; should it, the user's call must not see it
             * (nor an unraisable hook, which may call back into here): a plain callee.  An
             * interrupt that came meanwhile is the call's. */
            if (terra_interrupted())
                return -1;
            dl = 0;
        }
        Py_XSETREF(self->seen_key, Py_NewRef(key));
        self->seen_dl = dl;
    }
    if (!self->seen_dl)
        return 0;
    dl_calls++;
    self->dl_count++;
    if (call_handler != NULL && !self->offered) {
        /* once per site: the runtime sees which function calls DL ops (function units) */
        self->offered = 1;
        return 1;
    }
    return routing || route_always;
}

/* A site's plain call while a profile function is set (sys.setprofile, profile; cProfile on
 * 3.11): CPython's CALL tells it of a builtin callee (c_call, then c_return or c_exception),
 * which a call made from C would not.  The callee as reported (NULL: not reported): a builtin
 * function or method, or a method descriptor bound to its first argument (ceval.c's
 * trace_call_function; sys_profile_call_or_return on 3.12+). */
static PyObject *
profiled_callee(PyThreadState *ts, PyObject *callee, PyObject *self_arg)
{
    if (ts->c_profilefunc == NULL || ts->tracing)
        return NULL;
    if (PyCFunction_Check(callee))
        return Py_NewRef(callee);
    if (Py_IS_TYPE(callee, &PyMethodDescr_Type) && self_arg != NULL) {
        PyObject *bound = Py_TYPE(callee)->tp_descr_get(callee, self_arg, (PyObject *)Py_TYPE(self_arg));
        if (bound == NULL)
            PyErr_Clear(); /* (the call itself raises) */
        return bound;
    }
    return NULL;
}

/* Tell the profile function `what` of `callee`, out of its own sight.  -1: it raised. */
static int
profile_event(PyThreadState *ts, int what, PyObject *callee)
{
    Py_tracefunc fn = ts->c_profilefunc;
    PyFrameObject *frame = PyEval_GetFrame();
    if (fn == NULL || frame == NULL)
        return 0;
    PyObject *obj = Py_XNewRef(ts->c_profileobj);
    Py_INCREF(frame);
    PyThreadState_EnterTracing(ts);  /* (as CPython calls it: the tool's own code, in_tool) */
    int err = fn(obj, frame, what, callee);
    PyThreadState_LeaveTracing(ts);
    Py_DECREF(frame);
    Py_XDECREF(obj);
    return err ? -1 : 0;
}

/* After the call of a reported callee: c_return, or c_exception with the call's exception
 * kept (a profile function that raises replaces the result, as in ceval.c).  Steals
 * `reported`. */
static PyObject *
profile_returned(PyThreadState *ts, PyObject *reported, PyObject *result)
{
    if (result != NULL) {
        if (profile_event(ts, PyTrace_C_RETURN, reported) < 0)
            Py_CLEAR(result);
    }
    else {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (profile_event(ts, PyTrace_C_EXCEPTION, reported) == 0)
            PyErr_Restore(type, value, tb);
        else {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
    }
    Py_DECREF(reported);
    return result;
}

/* callee(*args) for a site, as CALL makes it (see profiled_callee). */
static PyObject *
plain_call(PyThreadState *ts, int watched_now, PyObject *callee, PyObject *const *args,
           size_t nargsf, PyObject *kwnames)
{
    PyObject *reported = watched_now ? profiled_callee(
        ts, callee, PyVectorcall_NARGS(nargsf) ? args[0] : NULL) : NULL;
    if (reported == NULL)
        return PyObject_Vectorcall(callee, args, nargsf, kwnames);
    if (profile_event(ts, PyTrace_C_CALL, reported) < 0) {
        Py_DECREF(reported);
        return NULL;
    }
    return profile_returned(ts, reported, PyObject_Vectorcall(callee, args, nargsf, kwnames));
}

/* callee(*tuple, **kwargs) for an unpacking site, as CALL_FUNCTION_EX makes it. */
static PyObject *
plain_call_ex(PyThreadState *ts, int watched_now, PyObject *callee, PyObject *tuple, PyObject *kwargs)
{
    PyObject *reported = watched_now ? profiled_callee(
        ts, callee, PyTuple_GET_SIZE(tuple) ? PyTuple_GET_ITEM(tuple, 0) : NULL) : NULL;
    if (reported == NULL)
        return PyObject_Call(callee, tuple, kwargs);
    if (profile_event(ts, PyTrace_C_CALL, reported) < 0) {
        Py_DECREF(reported);
        return NULL;
    }
    return profile_returned(ts, reported, PyObject_Call(callee, tuple, kwargs));
}

/* handler(site, *args) with args[0] the callee, borrowing args[-1] when the caller lent it. */
static PyObject *
route(SiteObject *self, PyObject *const *args, Py_ssize_t nargs, size_t nargsf, PyObject *kwnames)
{
    if (nargsf & PY_VECTORCALL_ARGUMENTS_OFFSET) {
        PyObject **slot = (PyObject **)args - 1;
        PyObject *saved = *slot;
        *slot = (PyObject *)self;
        PyObject *result = PyObject_Vectorcall(route_handler, slot, (size_t)(nargs + 1), kwnames);
        *slot = saved;
        return result;
    }
    Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject **copy = PyMem_Malloc((size_t)(total + 1) * sizeof(PyObject *));
    if (copy == NULL)
        return PyErr_NoMemory();
    copy[0] = (PyObject *)self;
    memcpy(copy + 1, args, (size_t)total * sizeof(PyObject *));
    PyObject *result = PyObject_Vectorcall(route_handler, copy, (size_t)(nargs + 1), kwnames);
    PyMem_Free(copy);
    return result;
}

static PyObject *
site_vectorcall(SiteObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "a terra_bc site needs the callee as first argument");
        return NULL;
    }
    self->count++;
    sites_executed++;
    PyThreadState *ts = PyThreadState_GET();
    int hide = watched(ts, NULL);
    int routed = should_route(self, args[0], hide);
    if (routed < 0)
        return NULL;
    if (routed) {
        PyObject *it = terra_current_iteration();
        if (it != NULL) {  /* a co-executed op: checked and skipped in C */
            PyObject *r = terra_fast_op(it, args[0], args + 1, nargs - 1, kwnames);
            if (!terra_fast_is_miss(r))
                return r;
            Py_DECREF(r);
        }
        if (hide)
            hide_begin(ts);
        routed_calls++;
        PyObject *r = route(self, args, nargs, nargsf, kwnames);
        routed_calls--;
        if (hide)
            hide_end(ts);
        return r;
    }
    /* Our args[0] slot may be borrowed by the callee only if our caller lent us args[-1]. */
    size_t offset = nargsf & PY_VECTORCALL_ARGUMENTS_OFFSET;
    return plain_call(ts, hide, args[0], args + 1, (size_t)(nargs - 1) | offset, kwnames);
}

/* The site of a call with * or ** arguments: site(callee, args_iterable[, kwargs_dict]).
 * Raises what CALL_FUNCTION_EX raises for a non-iterable: "f() argument after * must be ...". */
static PyObject *
site_unpacking_vectorcall(SiteObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 2 || nargs > 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a terra_bc unpacking site takes (callee, args[, kwargs])");
        return NULL;
    }
    self->count++;
    sites_executed++;
    PyObject *callee = args[0], *positional = args[1], *keywords = nargs == 3 ? args[2] : NULL;
    PyThreadState *ts = PyThreadState_GET();
    int hide = watched(ts, NULL);
    int routed = should_route(self, callee, hide);
    if (routed < 0)
        return NULL;
    if (routed)
        callee = route_handler; /* called below with (site, callee) prepended to the args */
    if (PyTuple_CheckExact(positional) && !routed)
        return plain_call_ex(ts, hide, callee, positional, keywords);
    if (Py_TYPE(positional)->tp_iter == NULL && !PySequence_Check(positional)) {
        PyObject *name = _PyObject_FunctionStr(args[0]); /* (the callee, routed or not) */
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "%U argument after * must be an iterable, not %.200s",
                         name, Py_TYPE(positional)->tp_name);
            Py_DECREF(name);
        }
        return NULL;
    }
    PyObject *tuple = PySequence_Tuple(positional);
    if (tuple == NULL)
        return NULL;
    if (routed) {
        PyObject *head = PyTuple_Pack(2, (PyObject *)self, args[0]);
        PyObject *full = head ? PySequence_Concat(head, tuple) : NULL;
        Py_XDECREF(head);
        Py_SETREF(tuple, full);
        if (tuple == NULL)
            return NULL;
    }
    PyObject *result;
    if (!routed)
        result = plain_call_ex(ts, hide, callee, tuple, keywords);
    else {
        if (hide)
            hide_begin(ts);
        routed_calls++;
        result = PyObject_Call(callee, tuple, keywords);
        routed_calls--;
        if (hide)
            hide_end(ts);
    }
    Py_DECREF(tuple);
    return result;
}

static PyObject *
site_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "unpacking", NULL};
    PyObject *key;
    int unpacking = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:Site", kwlist, &key, &unpacking))
        return NULL;
    SiteObject *self = (SiteObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)(unpacking ? site_unpacking_vectorcall : site_vectorcall);
    self->unpacking = unpacking;
    self->key = Py_NewRef(key);
    self->count = 0;
    self->seen_key = NULL;
    self->seen_dl = 0;
    self->dl_count = 0;
    return (PyObject *)self;
}

static void
site_dealloc(SiteObject *self)
{
    Py_XDECREF(self->key);
    Py_XDECREF(self->seen_key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
site_repr(SiteObject *self)
{
    return PyUnicode_FromFormat("<terra_bc site %R count=%llu>", self->key, self->count);
}

static PyMemberDef site_members[] = {
    {"key", T_OBJECT, offsetof(SiteObject, key), READONLY,
     "(filename, qualname, first line, offset of the call instruction)"},
    {"count", T_ULONGLONG, offsetof(SiteObject, count), READONLY, "calls made through this site"},
    {"dl_count", T_ULONGLONG, offsetof(SiteObject, dl_count), READONLY,
     "calls whose callee was a DL op while the runtime was attached"},
    {"unpacking", T_INT, offsetof(SiteObject, unpacking), READONLY,
     "true for f(*args, **kwargs) sites, called as site(f, args[, kwargs])"},
    {NULL},
};

static PyTypeObject SiteType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.Site",
    .tp_basicsize = sizeof(SiteObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A rewritten call site: Site(key)(callee, *args, **kwargs) calls callee(*args, **kwargs).",
    .tp_new = site_new,
    .tp_dealloc = (destructor)site_dealloc,
    .tp_repr = (reprfunc)site_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SiteObject, vectorcall),
    .tp_members = site_members,
};

/* ------------------------------------------------------------------ loops
 *
 * A rewritten `for` statement calls LoopMark(iterable) before GET_ITER.  While loop units
 * are on and this loop is not known to be plain Python, the loop's iterator is wrapped in
 * a LoopIter that tells the runtime when a turn begins (a turn that made DL-op calls),
 * and when the loop is left: exhausted, or the iterator dropped (break, return, raise). */

/* What a loop's mark (LoopMark, LoopHead) starts with: what the runtime reads and sets. */
#define LOOP_MARK_FIELDS \
    PyObject_HEAD \
    PyObject *key; \
    int state;          /* 0 undecided, 1 a unit (set by the runtime), -1 plain Python */ \
    Py_ssize_t turns;   /* how many turns its last execution will make, where its \
                           iterable (a list, tuple, range, dict or view) says so; else -1 */

typedef struct {
    LOOP_MARK_FIELDS
} LoopMarkObject;

typedef struct {
    PyObject_HEAD
    LoopMarkObject *mark;
    PyObject *inner;
    unsigned long long dl_at_start;  /* DL-op calls before the loop: did it make any? */
    unsigned long long dl_at_turn;
    Py_ssize_t turns;
    int open;           /* the runtime has an iteration open for this loop */
    int started;        /* next() has been called once */
} LoopIterObject;

static PyTypeObject LoopIterType;

/* LoopMark(key) and LoopHead(key). */
static PyObject *
loopmark_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *key;
    if (!PyArg_ParseTuple(args, "O", &key))
        return NULL;
    LoopMarkObject *self = (LoopMarkObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->key = Py_NewRef(key);
        self->turns = -1;
    }
    return (PyObject *)self;
}

static void
loopmark_dealloc(LoopMarkObject *self)
{
    Py_XDECREF(self->key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
loopmark_call(LoopMarkObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *iterable;
    if (!PyArg_ParseTuple(args, "O:LoopMark", &iterable))
        return NULL;
    PyObject *inner = PyObject_GetIter(iterable);
    if (inner == NULL || loop_handler == NULL || self->state < 0 || in_callback)
        return inner;
    /* Only containers whose length costs nothing and runs no user code. */
    self->turns = PyList_CheckExact(iterable) ? PyList_GET_SIZE(iterable)
        : PyTuple_CheckExact(iterable) ? PyTuple_GET_SIZE(iterable)
        : PyDict_CheckExact(iterable) ? PyDict_GET_SIZE(iterable)
        : PyRange_Check(iterable) || PyDictItems_Check(iterable) || PyDictKeys_Check(iterable)
          || PyDictValues_Check(iterable) ? PyObject_Length(iterable) : -1;
    if (self->turns < 0)
        PyErr_Clear();  /* (a range too long for a Py_ssize_t) */
    LoopIterObject *it = PyObject_New(LoopIterObject, &LoopIterType);
    if (it == NULL) {
        Py_DECREF(inner);
        return NULL;
    }
    it->mark = (LoopMarkObject *)Py_NewRef(self);
    it->inner = inner;
    it->dl_at_start = it->dl_at_turn = dl_calls;
    it->turns = 0;
    it->open = 0;
    it->started = 0;
    return (PyObject *)it;
}

/* The loop is left (its iterator is freed: exhausted, break, return, raise): a whole
 * execution of three turns or more without a DL-op call (warm-up turns that act at random
 * and then start calling JAX are not one) is plain Python. */
static void
loop_left(LoopIterObject *it)
{
    LoopMarkObject *mark = it->mark;
    if (mark->state == 0 && it->turns >= 3 && dl_calls == it->dl_at_start)
        mark->state = -1;
}

/* The loop handler's answer r (stolen): is an iteration open now (*open)?  Returns -1 with
 * the error set where r is an exception: the program's own error, met ending the turn's
 * iteration (a callback that raised), which the loop raises where it turns; so is an
 * `interrupt` (stolen) that came as the handler began (call_quietly_taking; the program's
 * error it may also have met is then reported).  A failure of the handler itself (r NULL,
 * reported as unraisable) must not become the loop's. */
static int
loop_answer(PyObject *r, PyObject *interrupt, int *open)
{
    *open = 0;
    if (r != NULL && PyExceptionInstance_Check(r)) {
        if (interrupt == NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(r), r);
            Py_DECREF(r);
            return -1;
        }
        PyErr_SetObject((PyObject *)Py_TYPE(r), r);
        PyErr_WriteUnraisable(loop_handler);
    }
    else if (r != NULL)
        *open = PyObject_IsTrue(r) > 0;
    Py_XDECREF(r);
    if (interrupt != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(interrupt), interrupt);
        Py_DECREF(interrupt);
        return -1;
    }
    return 0;
}

/* Tell the runtime handler(mark, token, exiting) -> is an iteration open for this loop
 * now?  -1: the program's error is set (loop_answer). */
static int
notify_loop(LoopIterObject *it, int exiting)
{
    PyObject *interrupt;
    PyObject *r = call_quietly_taking(loop_handler, Py_BuildValue(
        "(OKi)", (PyObject *)it->mark, (unsigned long long)(uintptr_t)it, exiting), &interrupt);
    return loop_answer(r, interrupt, &it->open);
}

/* The program's error where the loop cannot raise it (its iterator is being freed, or
 * another exception is unwinding it): reported, as an error in __del__ is; an interrupt is
 * raised as soon as the main thread's Python runs again (report_error). */
static void
unraisable_program_error(void)
{
    report_error(loop_handler);
}

static PyObject *
loopiter_next(LoopIterObject *it)
{
    LoopMarkObject *mark = it->mark;
    PyObject *value = Py_TYPE(it->inner)->tp_iternext(it->inner);
    if (loop_handler == NULL || mark->state < 0) {
        /* nothing to tell */
    }
    else if (value == NULL) {
        if (it->open) { /* the loop is exhausted (or its iterator raised): the turn ended */
            PyObject *type, *val, *tb;
            PyErr_Fetch(&type, &val, &tb);
            int raised = type != NULL && !PyErr_GivenExceptionMatches(type, PyExc_StopIteration);
            if (notify_loop(it, raised ? 2 : 1) < 0) {
                if (!raised) {  /* the loop ends by raising the program's error */
                    Py_XDECREF(type);
                    Py_XDECREF(val);
                    Py_XDECREF(tb);
                    return NULL;
                }
                unraisable_program_error();
            }
            PyErr_Restore(type, val, tb);
        }
    }
    else if (it->started) {
        int busy = dl_calls != it->dl_at_turn; /* the turn that just ended called DL ops */
        it->turns++;
        if ((busy || it->open || mark->state > 0) && PyErr_Occurred() == NULL
                && notify_loop(it, 0) < 0) {
            Py_DECREF(value);  /* the next turn does not begin: the loop raises */
            return NULL;
        }
    }
    else if (PyErr_Occurred() == NULL && notify_loop(it, 3) < 0) {
        /* the first turn begins (the runtime may open an iteration) or, where an interrupt
         * came meanwhile (the handler's answer), the loop raises it before any turn */
        Py_DECREF(value);
        return NULL;
    }
    it->started = 1;
    it->dl_at_turn = dl_calls;
    return value;
}

static void
loopiter_dealloc(LoopIterObject *it)
{
    if (it->open && loop_handler != NULL) {
        PyObject *type, *val, *tb;
        PyErr_Fetch(&type, &val, &tb);
        /* passes our mark and address only: we are being freed.  2: an exception is
         * unwinding the loop (the turn did not complete). */
        if (notify_loop(it, type != NULL ? 2 : 1) < 0)
            unraisable_program_error();
        PyErr_Restore(type, val, tb);
    }
    if (loop_handler != NULL && it->mark->state >= 0)
        loop_left(it);
    Py_XDECREF(it->mark);
    Py_XDECREF(it->inner);
    PyObject_Free(it);
}

static PyMemberDef loopmark_members[] = {
    {"key", T_OBJECT, offsetof(LoopMarkObject, key), READONLY, "(filename, qualname, line, offset)"},
    {"state", T_INT, offsetof(LoopMarkObject, state), 0, "0 undecided, 1 unit, -1 plain Python"},
    {"turns", T_PYSSIZET, offsetof(LoopMarkObject, turns), READONLY,
     "turns its last execution makes, where a list, tuple, range or dict says; else -1"},
    {NULL},
};

static PyTypeObject LoopMarkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.LoopMark",
    .tp_basicsize = sizeof(LoopMarkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Called with a for statement's iterable; returns its iterator (maybe watched).",
    .tp_new = loopmark_new,
    .tp_dealloc = (destructor)loopmark_dealloc,
    .tp_call = (ternaryfunc)loopmark_call,
    .tp_members = loopmark_members,
};

static PyTypeObject LoopIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.LoopIter",
    .tp_basicsize = sizeof(LoopIterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)loopiter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)loopiter_next,
};

/* ------------------------------------------------------------------ while loops
 *
 * A `while` loop has no iterator to watch.  The rewriter calls its LoopHead (no argument)
 * where each turn begins (the target of the loop's back edge) and a LoopExit wherever
 * control leaves the loop (the targets of its exit edges, exception handlers outside it
 * included); a return or an exception leaving the frame ends an open turn at the frame's
 * end (hook below).  The loop's execution is identified by its frame, which is also the
 * token given to the runtime.  A turn that made no DL-op call is not reported and does not
 * end the open iteration (conditions re-entered by `continue`, turns that only do Python
 * work); the head's call is made at every turn anyway, so a while loop is never declared
 * plain Python on its own. */

typedef struct {
    LOOP_MARK_FIELDS
} LoopHeadObject;

typedef struct {
    PyObject_HEAD
    LoopHeadObject *head;
    int raised;         /* an exception handler's entry: the turn did not complete */
} LoopExitObject;

static PyTypeObject LoopHeadType;

/* A head is a constant of the loop's code, shared by every thread running that loop: what
 * one execution of it knows is kept per thread, in a small table of the loops this thread
 * runs (nested loops, recursion, loops left by a `return` that are not forgotten yet). */
typedef struct {
    LoopHeadObject *head;   /* (borrowed, compared only; NULL: a free slot) */
    void *frame;            /* the frame running this loop in this thread */
    int open;               /* the runtime has an iteration open for this loop */
    unsigned long long dl_at_turn;
} WhileRun;

#define WHILE_RUNS 8
static THREAD_LOCAL WhileRun while_runs[WHILE_RUNS];
static THREAD_LOCAL unsigned int while_evict = 0;

/* The head whose turn is open in this thread, told when its frame ends (strong ref). */
static THREAD_LOCAL LoopHeadObject *open_head = NULL;

static WhileRun *
find_run(LoopHeadObject *head)
{
    for (int i = 0; i < WHILE_RUNS; i++)
        if (while_runs[i].head == head)
            return &while_runs[i];
    return NULL;
}

/* A slot for `head` (a free one, else one taken in turn, never the open turn's loop). */
static WhileRun *
new_run(LoopHeadObject *head, void *frame)
{
    WhileRun *run = NULL;
    for (int i = 0; i < WHILE_RUNS && run == NULL; i++)
        if (while_runs[i].head == NULL)
            run = &while_runs[i];
    while (run == NULL) {
        WhileRun *r = &while_runs[while_evict++ % WHILE_RUNS];
        if (r->head != open_head)
            run = r;
    }
    run->head = head;
    run->frame = frame;
    run->open = 0;
    run->dl_at_turn = 0;
    return run;
}

#if PY_VERSION_HEX >= 0x030d0000
#define CURRENT_FRAME(ts) ((void *)(ts)->current_frame)
#else
#define CURRENT_FRAME(ts) ((void *)(ts)->cframe->current_frame)
#endif

/* Tell the handler about a while loop's head run by `frame`; -1: the program's error is
 * set (loop_answer), where no other exception was being raised (else it is reported as
 * unraisable).  The handler runs Python (maybe other while loops of this thread): the
 * loop's slot is looked up again after it. */
static int
notify_head(LoopHeadObject *head, void *frame, int exiting)
{
    PyObject *type, *val, *tb;
    PyErr_Fetch(&type, &val, &tb);
    PyObject *interrupt;
    PyObject *r = call_quietly_taking(loop_handler, Py_BuildValue(
        "(OKi)", (PyObject *)head, (unsigned long long)(uintptr_t)frame, exiting), &interrupt);
    int open = 0;
    int failed = loop_answer(r, interrupt, &open);
    if (failed && type != NULL) {
        unraisable_program_error();
        failed = 0;
    }
    if (!failed)
        PyErr_Restore(type, val, tb);
    else {
        Py_XDECREF(val);
        Py_XDECREF(tb);
    }
    WhileRun *run = find_run(head);
    if (run == NULL && open)
        run = new_run(head, frame);
    if (run != NULL)
        run->open = open;
    if (open)
        Py_XSETREF(open_head, (LoopHeadObject *)Py_NewRef(head));
    else if (open_head == head)
        Py_CLEAR(open_head);
    return failed;
}

/* The loop is left (exiting 1: normally, 2: by an exception).  -1: the program's error is
 * set (notify_head). */
static int
leave_loop(LoopHeadObject *head, int exiting)
{
    int failed = 0;
    WhileRun *run = find_run(head);
    if (run != NULL && run->open && loop_handler != NULL)
        failed = notify_head(head, run->frame, exiting);
    run = find_run(head);
    if (run != NULL)
        run->head = NULL;
    if (open_head == head)
        Py_CLEAR(open_head);
    return failed;
}

static PyObject *
loophead_call(PyObject *callable, PyObject *args, PyObject *kwds)
{
    LoopHeadObject *head = (LoopHeadObject *)callable;
    if (loop_handler == NULL || head->state < 0 || in_callback || watched(PyThreadState_GET(), NULL))
        Py_RETURN_NONE;
    void *frame = CURRENT_FRAME(PyThreadState_GET());
    WhileRun *run = find_run(head);
    if (run == NULL || run->frame != frame) { /* the loop is entered: its first turn begins */
        if (run == NULL)
            run = new_run(head, frame);
        run->frame = frame;
        run->open = 0;
        if (head->state > 0 && notify_head(head, frame, 3) < 0) /* a known unit: an iteration */
            return NULL;
    }
    else if (dl_calls != run->dl_at_turn) { /* the turn that just ended called DL ops */
        if (notify_head(head, frame, 0) < 0)
            return NULL;        /* the program's error, raised where the loop turns */
    }
    run = find_run(head);
    if (run != NULL)
        run->dl_at_turn = dl_calls;
    Py_RETURN_NONE;
}

static PyObject *
loopexit_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *head;
    int raised = 0;
    if (!PyArg_ParseTuple(args, "O|p:LoopExit", &head, &raised))
        return NULL;
    if (!PyObject_TypeCheck(head, &LoopHeadType)) {
        PyErr_SetString(PyExc_TypeError, "LoopExit(head): head must be a LoopHead");
        return NULL;
    }
    LoopExitObject *self = (LoopExitObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->head = (LoopHeadObject *)Py_NewRef(head);
        self->raised = raised;
    }
    return (PyObject *)self;
}

static void
loopexit_dealloc(LoopExitObject *self)
{
    Py_XDECREF(self->head);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
loopexit_call(PyObject *callable, PyObject *args, PyObject *kwds)
{
    LoopExitObject *self = (LoopExitObject *)callable;
    LoopHeadObject *head = self->head;
    WhileRun *run = find_run(head);
    if (run != NULL && run->frame == CURRENT_FRAME(PyThreadState_GET())
            && leave_loop(head, self->raised ? 2 : 1) < 0)
        return NULL;            /* the program's error, raised where the loop is left */
    Py_RETURN_NONE;
}

/* A frame ends: the turn of a while loop open in it ends with it (a return inside the loop,
 * or an exception leaving the frame). */
static inline void
frame_ends(void *frame, int raised)
{
    if (open_head == NULL)
        return;
    WhileRun *run = find_run(open_head);
    if (run != NULL && run->frame == frame && leave_loop(open_head, raised ? 2 : 1) < 0)
        unraisable_program_error();
}

static PyMemberDef loopexit_members[] = {
    {"head", T_OBJECT, offsetof(LoopExitObject, head), READONLY, "the loop's LoopHead"},
    {"raised", T_INT, offsetof(LoopExitObject, raised), READONLY, "an exception handler's entry"},
    {NULL},
};

static PyTypeObject LoopHeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.LoopHead",
    .tp_basicsize = sizeof(LoopHeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Called with no argument where each turn of a while loop begins.",
    .tp_new = loopmark_new,
    .tp_dealloc = (destructor)loopmark_dealloc,
    .tp_call = loophead_call,
    .tp_members = loopmark_members,
};

static PyTypeObject LoopExitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "terra_bc._hook.LoopExit",
    .tp_basicsize = sizeof(LoopExitObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "LoopExit(head, raised=False): called with no argument where a while loop is left.",
    .tp_new = loopexit_new,
    .tp_dealloc = (destructor)loopexit_dealloc,
    .tp_call = loopexit_call,
    .tp_members = loopexit_members,
};

/* ------------------------------------------------------------------ frame hook */

/* With any eval hook installed, CPython stops inlining Python-to-Python calls: each call
 * then enters the C evaluator, which 3.12+ charges as C recursion (2 units).  We refund
 * those units so Python recursion reaches the same depth as without the hook, and guard
 * the real C stack ourselves so a deep recursion raises RecursionError, never overflows. */
#if PY_VERSION_HEX >= 0x030c0000
#define EVAL_C_UNITS 2
#else
#define EVAL_C_UNITS 0 /* 3.11 counts Python frames and C calls in one counter: no change */
#endif
#define STACK_MARGIN (256 * 1024)
static THREAD_LOCAL char *stack_low = NULL; /* lowest address of this thread's stack */

static int
stack_nearly_exhausted(void)
{
    char here;
    if (stack_low == NULL) {
        pthread_attr_t attr;
        void *addr = NULL;
        size_t size = 0;
        stack_low = (char *)1; /* unknown bounds: never trip */
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            if (pthread_attr_getstack(&attr, &addr, &size) == 0 && addr != NULL)
                stack_low = (char *)addr;
            pthread_attr_destroy(&attr);
        }
    }
    return &here > stack_low && (size_t)(&here - stack_low) < STACK_MARGIN;
}

static PyObject *
run_previous(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    if (!throwflag && stack_nearly_exhausted()) {
        /* The frame must still be run (and so cleared) by the evaluator: enter it with
         * throwflag set, as generator.throw() does, so it unwinds at once. */
        PyErr_SetString(PyExc_RecursionError,
                        "maximum recursion depth exceeded (C stack nearly exhausted)");
        return previous(ts, frame, 1);
    }
#if EVAL_C_UNITS
    ts->c_recursion_remaining += EVAL_C_UNITS;
    PyObject *result = previous(ts, frame, throwflag);
    ts->c_recursion_remaining -= EVAL_C_UNITS;
    return result;
#else
    return previous(ts, frame, throwflag);
#endif
}

static void
free_extra(void *extra)
{
    Py_XDECREF((PyObject *)extra);
}

/* Ask the callback about `code` once; cache a strong reference to the answer. */
static PyObject *
decide(PyCodeObject *code)
{
    in_callback = 1;
    PyObject *answer = PyObject_CallOneArg(callback, (PyObject *)code);
    in_callback = 0;
    if (answer == NULL) {
        /* The Python side catches and logs its own errors; what reaches here is
         * KeyboardInterrupt, MemoryError and the like: decide again next time.  An
         * interrupt is the frame's (NULL: it is raised as the frame begins, see hook). */
        return terra_interrupted() ? NULL : Py_None;
    }
    /* Another thread may have decided meanwhile (the callback runs Python, which lets other
     * threads run): its answer stays, the frames it started run it. */
    void *other = NULL;
    if (CODE_GET_EXTRA((PyObject *)code, extra_index, &other) == 0 && other != NULL) {
        Py_DECREF(answer);
        return (PyObject *)other;
    }
    PyErr_Clear();
    if (answer != Py_None) {
        PyCodeObject *new_code = (PyCodeObject *)answer;
        /* The swap reuses the frame as allocated for `code`: same locals, no more room. */
        if (!PyCode_Check(answer) || new_code->co_nlocalsplus != code->co_nlocalsplus
            || new_code->co_stacksize > code->co_stacksize) {
            Py_SETREF(answer, Py_NewRef(Py_None));
        }
        else if (CODE_SET_EXTRA(answer, extra_index, Py_NewRef(Py_None)) < 0) {
            PyErr_Clear();
        }
    }
    if (CODE_SET_EXTRA((PyObject *)code, extra_index, answer) < 0) {
        PyErr_Clear();
        Py_DECREF(answer);
        return Py_None;
    }
    return answer; /* borrowed from the code extra */
}

/* Call the Python side of function units; its errors never reach the user's call. */
static PyObject *
call_unit_handler(PyObject *mark, PyObject *token, int state)
{
    in_callback = 1;
    PyObject *r = call_quietly(call_handler, Py_BuildValue("(OOi)", mark, token, state));
    in_callback = 0;
    return r;
}

/* A call of a function the runtime marked as a unit: it may open an iteration (returns a
 * token), which is closed with the outcome when the frame returns or raises.  All decisions
 * are the runtime's (runtime/discovery.py, on_call). */
static PyObject *
run_as_unit(PyThreadState *ts, _PyInterpreterFrame *frame, PyObject *mark)
{
    PyObject *token = call_unit_handler(mark, Py_None, 0);
    if (token == NULL || token == Py_None) {
        Py_XDECREF(token);
        return run_previous(ts, frame, 0);
    }
    PyObject *result = run_previous(ts, frame, 0);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  /* the frame's exception, kept across the end call */
    Py_XDECREF(call_unit_handler(mark, token, result != NULL ? 1 : 2));
    PyErr_Restore(type, value, tb);
    Py_DECREF(token);
    return result;
}

static PyObject *
hook(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    if (!THREAD_ENABLED() || in_callback || throwflag || callback == NULL)
        return run_previous(ts, frame, throwflag);
    PyCodeObject *code = FRAME_CODE(frame);
    /* A frame that begins while a tool watches runs its original code, except the frames
     * of an iteration that still routes DL-op calls while one watches (a gradient it
     * records: runtime/tools.py); the tool's own code always does. */
    if (!PyCode_Check(code) || (code->co_flags & UNTOUCHABLE)
        || frame->owner != FRAME_OWNED_BY_THREAD
        || ((!routing || in_tool(ts)) && watched(ts, code)))
        return run_previous(ts, frame, throwflag);
    /* What CODE_GET_EXTRA does, inlined: this runs for every Python call. */
    CodeExtras *extras = (CodeExtras *)code->co_extra;
    void *extra = extras != NULL && extra_index < extras->ce_size ? extras->ce_extras[extra_index] : NULL;
    PyObject *replacement = extra ? (PyObject *)extra : decide(code);
    if (replacement == NULL)  /* an interrupt came: the frame begins by raising it */
        return previous(ts, frame, 1);
    if (replacement == Py_None)
        return run_previous(ts, frame, throwflag);
    /* No instruction of the frame has run yet: swap the code and start from its top.  The
     * frame holds a strong reference to its code; the function keeps the original alive. */
    SET_FRAME_CODE(frame, (PyCodeObject *)Py_NewRef(replacement));
    RESET_IP(frame, (PyCodeObject *)replacement);
    Py_DECREF(code);
    frames_swapped++;
    void *mark = NULL;
    PyObject *result;
    if (call_handler != NULL && !routing /* inside an iteration: part of it */
        && !(((PyCodeObject *)replacement)->co_flags & CO_GENERATOR)
        && CODE_GET_EXTRA(replacement, mark_index, &mark) == 0 && mark != NULL)
        result = run_as_unit(ts, frame, (PyObject *)mark);
    else
        result = run_previous(ts, frame, throwflag);
    frame_ends(frame, result == NULL);
    return result;
}

static void
install(void)
{
    PyInterpreterState *interp = PyInterpreterState_Get();
    _PyFrameEvalFunction current = _PyInterpreterState_GetEvalFrameFunc(interp);
    if (current == hook)
        return;
    previous = current;
    _PyInterpreterState_SetEvalFrameFunc(interp, hook);
}

static void
uninstall(void)
{
    PyInterpreterState *interp = PyInterpreterState_Get();
    /* If someone chained on top of us, stay installed: we pass through when disabled. */
    if (_PyInterpreterState_GetEvalFrameFunc(interp) == hook)
        _PyInterpreterState_SetEvalFrameFunc(interp, previous);
}

/* ------------------------------------------------------------------ module functions */

/* *slot = fn (None: no handler), for the module's set_* functions. */
static PyObject *
set_handler(PyObject **slot, PyObject *fn, const char *error)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, error);
        return NULL;
    }
    Py_XSETREF(*slot, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_RETURN_NONE;
}

static PyObject *
set_callback(PyObject *mod, PyObject *fn)
{
    return set_handler(&callback, fn, "callback must be callable or None");
}

/* This thread's choice becomes `choice`; the hook is installed while anyone uses it. */
static void
choose(int choice)
{
    int was_on = enabled_threads > 0 || default_enabled;
    enabled_threads += (choice == CHOSE_ON) - (thread_choice == CHOSE_ON);
    thread_choice = choice;
    int on = enabled_threads > 0 || default_enabled;
    if (on && !was_on)
        install();
    else if (was_on && !on)
        uninstall();
}

static PyObject *
enable_thread(PyObject *mod, PyObject *unused)
{
    choose(CHOSE_ON);
    Py_RETURN_NONE;
}

static PyObject *
disable_thread(PyObject *mod, PyObject *unused)
{
    choose(CHOSE_OFF);
    Py_RETURN_NONE;
}

static PyObject *
is_thread_enabled(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(THREAD_ENABLED());
}

static PyObject *
get_thread_choice(PyObject *mod, PyObject *unused)
{
    if (thread_choice == FOLLOWS_DEFAULT)
        Py_RETURN_NONE;
    return PyBool_FromLong(thread_choice == CHOSE_ON);
}

/* A choice as thread_choice() gives it (True, False, None) put back. */
static void
choose_as(PyObject *choice)
{
    choose(choice == Py_None ? FOLLOWS_DEFAULT : PyObject_IsTrue(choice) > 0 ? CHOSE_ON : CHOSE_OFF);
}

static PyObject *
set_thread_choice(PyObject *mod, PyObject *choice)
{
    choose_as(choice);
    Py_RETURN_NONE;
}

static PyObject *
set_default(PyObject *mod, PyObject *on)
{
    int was = default_enabled, was_on = enabled_threads > 0 || default_enabled;
    default_enabled = PyObject_IsTrue(on) > 0;
    int now_on = enabled_threads > 0 || default_enabled;
    if (now_on && !was_on)
        install();
    else if (was_on && !now_on)
        uninstall();
    return PyBool_FromLong(was);
}

static PyObject *
is_installed(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(_PyInterpreterState_GetEvalFrameFunc(PyInterpreterState_Get()) == hook);
}

static PyObject *
cached_decision(PyObject *mod, PyObject *code)
{
    if (!PyCode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "expected a code object");
        return NULL;
    }
    void *extra = NULL;
    if (CODE_GET_EXTRA(code, extra_index, &extra) < 0)
        return NULL;
    if (extra == NULL)
        return Py_NewRef(Py_Ellipsis); /* not decided yet */
    return Py_NewRef((PyObject *)extra);
}

static PyObject *
counters(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("{sKsK}", "sites_executed", sites_executed,
                         "frames_swapped", frames_swapped);
}

static PyObject *
reset_counters(PyObject *mod, PyObject *unused)
{
    sites_executed = frames_swapped = 0;
    terra_fast_reset();
    Py_RETURN_NONE;
}

static PyObject *
set_routing(PyObject *mod, PyObject *args)
{
    PyObject *handler, *classify;
    if (!PyArg_ParseTuple(args, "OO:set_routing", &handler, &classify))
        return NULL;
    if ((handler != Py_None && !PyCallable_Check(handler))
        || (classify != Py_None && !PyCallable_Check(classify))) {
        PyErr_SetString(PyExc_TypeError, "set_routing(handler, classify) takes callables or None");
        return NULL;
    }
    Py_XSETREF(route_handler, handler == Py_None ? NULL : Py_NewRef(handler));
    Py_XSETREF(route_classify, classify == Py_None ? NULL : Py_NewRef(classify));
    Py_RETURN_NONE;
}

/* This thread routes DL-op calls if `on` and there is somewhere to route them. */
static void
route_thread(PyObject *on)
{
    routing = PyObject_IsTrue(on) > 0 && route_handler != NULL && route_classify != NULL;
}

static PyObject *
set_thread_routing(PyObject *mod, PyObject *on)
{
    int was = routing;
    route_thread(on);
    return PyBool_FromLong(was);
}

static PyObject *
thread_routing(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(routing);
}

/* An iteration opens and closes in this thread in one call each, never in several: an
 * interrupt comes as a call returns (CPython checks for one there), and between two calls
 * it left a state changed whose old value was not noted yet, or not put back (routing left
 * on in the thread for good, and with it frames that began under a trace function ran
 * rewritten code).  The old states are noted on the iteration (runtime/context.py). */
static PyObject *
open_iteration(PyObject *mod, PyObject *it)
{
    PyObject *choice = get_thread_choice(mod, NULL);
    if (choice == NULL)
        return NULL;
    int failed = PyObject_SetAttrString(it, "hook_was_enabled", choice) < 0
        || PyObject_SetAttrString(it, "was_routing", routing ? Py_True : Py_False) < 0;
    Py_DECREF(choice);
    if (failed)
        return NULL;
    route_thread(Py_True);
    choose(CHOSE_ON);
    Py_XDECREF(terra_set_iteration(it));
    Py_RETURN_NONE;
}

static PyObject *
close_iteration(PyObject *mod, PyObject *args)
{
    PyObject *it, *unchanged;
    if (!PyArg_ParseTuple(args, "OO:close_iteration", &it, &unchanged))
        return NULL;
    PyObject *was_routing = PyObject_GetAttrString(it, "was_routing");
    PyObject *choice = was_routing ? PyObject_GetAttrString(it, "hook_was_enabled") : NULL;
    if (choice == NULL) {
        Py_XDECREF(was_routing);
        return NULL;
    }
    if (was_routing != unchanged)
        route_thread(was_routing);
    if (choice != unchanged)
        choose_as(choice);
    Py_DECREF(was_routing);
    Py_DECREF(choice);
    Py_XDECREF(terra_set_iteration(NULL));
    /* Once an iteration has ended, its placeholders may be anywhere: route_always, for good. */
    route_always = 1;
    Py_RETURN_NONE;
}

static PyObject *
set_loop_handler(PyObject *mod, PyObject *fn)
{
    return set_handler(&loop_handler, fn, "set_loop_handler takes a callable or None");
}

static PyObject *
set_call_handler(PyObject *mod, PyObject *fn)
{
    return set_handler(&call_handler, fn, "set_call_handler takes a callable or None");
}

static PyObject *
set_unit_mark(PyObject *mod, PyObject *args)
{
    PyObject *code, *mark;
    if (!PyArg_ParseTuple(args, "O!O:set_unit_mark", &PyCode_Type, &code, &mark))
        return NULL;
    /* SetExtra releases the previous mark itself (through free_extra). */
    PyObject *new_mark = mark == Py_None ? NULL : Py_NewRef(mark);
    if (CODE_SET_EXTRA(code, mark_index, new_mark) < 0) {
        Py_XDECREF(new_mark);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Frames of `code` run its original code from now on (frames running the rewritten code
 * go on with it: each holds its own reference).  SetExtra releases the replacement. */
static PyObject *
revert(PyObject *mod, PyObject *code)
{
    if (!PyCode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "revert takes a code object");
        return NULL;
    }
    if (CODE_SET_EXTRA(code, extra_index, Py_NewRef(Py_None)) < 0) {
        Py_DECREF(Py_None);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
set_watch_handler(PyObject *mod, PyObject *fn)
{
    return set_handler(&watch_handler, fn, "set_watch_handler takes a callable or None");
}

static PyObject *
is_watched(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(watched(PyThreadState_GET(), NULL));
}

static PyObject *
watch_check(PyObject *mod, PyObject *unused)
{
    if (!watched(PyThreadState_GET(), NULL))
        Py_RETURN_FALSE;
    routed_while_watched();
    Py_RETURN_TRUE;
}

static PyObject *
set_route_always(PyObject *mod, PyObject *on)
{
    route_always = PyObject_IsTrue(on) > 0;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_loop_handler", set_loop_handler, METH_O,
     "set_loop_handler(fn): fn(mark, token, exiting) -> iteration open?, at loop turns and exits."},
    {"set_call_handler", set_call_handler, METH_O,
     "set_call_handler(fn): fn(mark, token, state) for calls of marked code (0: begins, "
     "returns a token or None; 1: returned; 2: raised)."},
    {"revert", revert, METH_O,
     "revert(code): frames of `code` begin with its original code from now on."},
    {"set_unit_mark", set_unit_mark, METH_VARARGS,
     "set_unit_mark(code, mark): calls of rewritten `code` go through the call handler (None: no more)."},
    {"set_watch_handler", set_watch_handler, METH_O,
     "set_watch_handler(fn): fn() -> still routed?, when a tool watches a thread whose "
     "iteration routes DL-op calls."},
    {"watched", is_watched, METH_NOARGS,
     "Is a tool (trace or profile function, sys.monitoring tool) watching this thread?"},
    {"watch_check", watch_check, METH_NOARGS,
     "watched(), telling the watch handler first if this thread's iteration still routes."},
    {"set_route_always", set_route_always, METH_O,
     "Route DL-op calls to the handler outside iterations too (escaped placeholders)."},
    {"set_routing", set_routing, METH_VARARGS,
     "set_routing(handler, classify): where routed DL-op calls go; classify(callee) -> bool."},
    {"set_thread_routing", set_thread_routing, METH_O,
     "Route DL-op calls in this thread (True inside a unit iteration); returns the old state."},
    {"thread_routing", thread_routing, METH_NOARGS,
     "Does this thread route DL-op calls (an iteration is open in it)?"},
    {"open_iteration", open_iteration, METH_O,
     "open_iteration(it): it is this thread's open iteration (routing on, hook enabled); "
     "the old states are noted on it (was_routing, hook_was_enabled)."},
    {"close_iteration", close_iteration, METH_VARARGS,
     "close_iteration(it, unchanged): this thread as before open_iteration(it); a noted "
     "state that is `unchanged` is left as it is. Route DL-op calls outside iterations from now on."},
    {"set_callback", set_callback, METH_O,
     "set_callback(fn): fn(code) -> replacement code or None, asked once per code object."},
    {"enable_thread", enable_thread, METH_NOARGS, "Enable the hook for the calling thread."},
    {"disable_thread", disable_thread, METH_NOARGS, "Disable the hook for the calling thread."},
    {"thread_enabled", is_thread_enabled, METH_NOARGS, "Is the hook enabled for this thread?"},
    {"thread_choice", get_thread_choice, METH_NOARGS,
     "This thread's choice: True (enable_thread), False (disable_thread), None (follows the default)."},
    {"set_thread_choice", set_thread_choice, METH_O,
     "Put back a choice thread_choice() returned."},
    {"set_default", set_default, METH_O,
     "set_default(on): whether threads that never chose run with the hook; returns the old default."},
    {"installed", is_installed, METH_NOARGS, "Is the hook the interpreter's eval function?"},
    {"cached_decision", cached_decision, METH_O,
     "The cached answer for a code object: replacement, None, or Ellipsis if undecided."},
    {"counters", counters, METH_NOARGS, "C-side counters as a dict."},
    {"reset_counters", reset_counters, METH_NOARGS, "Zero the C-side counters."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "terra_bc._hook", "PEP 523 frame hook and call-site dispatcher.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__hook(void)
{
    if (PyType_Ready(&SiteType) < 0)
        return NULL;
    if (mark_index < 0)
        mark_index = REQUEST_EXTRA_INDEX(free_extra);
    if (extra_index < 0) {
        extra_index = REQUEST_EXTRA_INDEX(free_extra);
        if (extra_index < 0 || mark_index < 0) {
            PyErr_SetString(PyExc_RuntimeError, "no code extra index left");
            return NULL;
        }
    }
    if (partial_type == NULL) {
        PyObject *functools = PyImport_ImportModule("functools");
        PyObject *partial = functools ? PyObject_GetAttrString(functools, "partial") : NULL;
        Py_XDECREF(functools);
        if (partial == NULL || !PyType_Check(partial)) {
            Py_XDECREF(partial);
            return NULL;
        }
        partial_type = (PyTypeObject *)partial; /* (kept: a reference for the process) */
        str_func = PyUnicode_InternFromString("func");
        if (str_func == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddFunctions(m, terra_fast_methods) < 0 || terra_fast_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&LoopMarkType) < 0 || PyType_Ready(&LoopIterType) < 0
        || PyType_Ready(&LoopHeadType) < 0 || PyType_Ready(&LoopExitType) < 0
        || PyModule_AddObjectRef(m, "LoopMark", (PyObject *)&LoopMarkType) < 0
        || PyModule_AddObjectRef(m, "LoopHead", (PyObject *)&LoopHeadType) < 0
        || PyModule_AddObjectRef(m, "LoopExit", (PyObject *)&LoopExitType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&UnseenType) < 0
        || PyModule_AddObjectRef(m, "Unseen", (PyObject *)&UnseenType) < 0
        || PyModule_AddObjectRef(m, "Site", (PyObject *)&SiteType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
