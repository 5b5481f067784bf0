/* A second PEP 523 hook for tests: counts the frames it sees, then chains on. */
#define Py_BUILD_CORE
#include <Python.h>
#include <internal/pycore_frame.h>

static _PyFrameEvalFunction below = NULL;
static long long seen = 0;

static PyObject *
counting(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    seen++;
    return below(ts, frame, throwflag);
}

static PyObject *
install(PyObject *m, PyObject *unused)
{
    PyInterpreterState *interp = PyInterpreterState_Get();
    below = _PyInterpreterState_GetEvalFrameFunc(interp);
    _PyInterpreterState_SetEvalFrameFunc(interp, counting);
    Py_RETURN_NONE;
}

static PyObject *
uninstall(PyObject *m, PyObject *unused)
{
    _PyInterpreterState_SetEvalFrameFunc(PyInterpreterState_Get(), below);
    Py_RETURN_NONE;
}

static PyObject *
is_current(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(_PyInterpreterState_GetEvalFrameFunc(PyInterpreterState_Get()) == counting);
}

static PyObject *
count(PyObject *m, PyObject *unused)
{
    return PyLong_FromLongLong(seen);
}

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, NULL},
    {"uninstall", uninstall, METH_NOARGS, NULL},
    {"is_current", is_current, METH_NOARGS, NULL},
    {"count", count, METH_NOARGS, NULL},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "other_hook", NULL, -1, methods};

PyMODINIT_FUNC
PyInit_other_hook(void)
{
    return PyModule_Create(&module);
}
