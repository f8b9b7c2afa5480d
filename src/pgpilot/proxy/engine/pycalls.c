/* Calling Python: every call into a protocol or handler object goes through py_method /
 * py_call_soon, which count it (Engine.select goes back to the event loop after a batch that
 * made any: the call may have scheduled work there), and an exception one raises goes to
 * report_error, never up through C. See engine.h, "who may call Python, and when". */

/* Calls into Python's protocol and handler objects, counted: Engine.select() goes back to the
 * event loop after a batch that made any, since they may have scheduled work there. */
static unsigned long python_calls;
#define py_method(...) (python_calls++, PyObject_CallMethod(__VA_ARGS__))
static int claim(ConnObject *c);
static void route_welcome(ConnObject *c, PyObject *final);
#define py_call_soon(e, fn, arg) \
    (python_calls++, PyObject_CallFunctionObjArgs((e)->call_soon, (fn), (arg), NULL))

static void report_error(EngineObject *e) {
    /* An exception from a Python callback: log it through Python, never let it unwind C. */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    if (!type) return;
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb && exc) PyException_SetTraceback(exc, tb);
    if (e && e->error_handler && e->error_handler != Py_None && exc) {
        PyObject *r = PyObject_CallOneArg(e->error_handler, exc);
        if (!r) PyErr_WriteUnraisable(e->error_handler);
        Py_XDECREF(r);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(type, exc, tb);
        PyErr_WriteUnraisable(NULL);
    }
}
