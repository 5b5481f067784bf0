/* The co-execution fast path (_fastop.c), as the frame hook's sites (_hook.c) use it. */
#ifndef TERRA_BC_FASTOP_H
#define TERRA_BC_FASTOP_H
#include <Python.h>

/* initial-exec: a plain TLS load on the hot paths, not a __tls_get_addr call. */
#define THREAD_LOCAL _Thread_local __attribute__((tls_model("initial-exec")))

PyObject *terra_current_iteration(void);
PyObject *terra_set_iteration(PyObject *it);  /* returns the old one (new reference) or NULL */
PyObject *terra_fast_op(PyObject *it, PyObject *fn, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames);
int terra_fast_is_miss(PyObject *result);
void terra_fast_reset(void);
int terra_fast_init(PyObject *module);
extern PyMethodDef terra_fast_methods[];
int terra_interrupted(void);  /* (_hook.c) */

#endif
