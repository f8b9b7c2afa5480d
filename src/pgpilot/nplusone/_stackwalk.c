/* _stackwalk.c: the query doctor's per-statement stack key, in C.
 *
 * While a detect() scope is open, every statement asks "have I seen this stack before in this
 * process?" (pgpilot/nplusone/callsite.py, stack_info): the answer is keyed by the code object
 * and instruction offset of each frame from the first application frame up to the frame that
 * opened the scope. Walking those frames in Python costs about ten bytecodes per frame; here
 * it is a loop over f_back reading two fields. callsite.py keeps a pure-Python version of
 * both functions for builds without a compiler; the two give different numbers, each
 * consistent within a process, which is all a dictionary key needs.
 *
 * Only the public frame API (PyFrame_GetBack, PyFrame_GetCode, PyFrame_GetLasti: 3.11+).
 * The walk starts at a frame the caller already holds (found with sys._getframe, which skips
 * the library frames without creating frame objects for them), so it creates none for frames
 * that had none: the frames it visits are the application's, alive for the whole loop.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 64-bit mixing (splitmix64's finalizer): a key for up to 64 (code, offset) pairs */
static inline uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

/* frames_key(frame, anchor, limit) -> int | None
 * A hash of (code object, instruction offset) of each frame from `frame` outward to `anchor`
 * (included), or None when `anchor` is not among the first `limit` frames. */
static PyObject *frames_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "frames_key(frame, anchor, limit)");
        return NULL;
    }
    if (!PyFrame_Check(args[0]) || !PyFrame_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "frames_key: frame and anchor must be frames");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyFrameObject *anchor = (PyFrameObject *)args[1];
    PyFrameObject *frame = (PyFrameObject *)args[0];
    Py_INCREF(frame);
    uint64_t h = 0x84222325cbf29ce4ULL;
    for (Py_ssize_t n = 0; n < limit && frame != NULL; n++) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        h = mix(h, (uint64_t)(uintptr_t)code);
        h = mix(h, (uint64_t)(unsigned)PyFrame_GetLasti(frame));
        Py_DECREF(code); /* the frame holds it: only its address is kept */
        if (frame == anchor) {
            Py_DECREF(frame);
            return PyLong_FromUnsignedLongLong(mix(h, (uint64_t)n));
        }
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    Py_XDECREF(frame);
    Py_RETURN_NONE;
}

/* frame_codes(frame, anchor, limit) -> tuple[code, ...]
 * The code objects frames_key read, so that a cache keyed by it can hold them (a code
 * object's address names it only while it is alive). */
static PyObject *frame_codes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "frame_codes(frame, anchor, limit)");
        return NULL;
    }
    if (!PyFrame_Check(args[0]) || !PyFrame_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "frame_codes: frame and anchor must be frames");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *codes = PyList_New(0);
    if (codes == NULL)
        return NULL;
    PyFrameObject *anchor = (PyFrameObject *)args[1];
    PyFrameObject *frame = (PyFrameObject *)args[0];
    Py_INCREF(frame);
    for (Py_ssize_t n = 0; n < limit && frame != NULL; n++) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        int failed = PyList_Append(codes, (PyObject *)code);
        Py_DECREF(code);
        if (failed || frame == anchor) {
            Py_DECREF(frame);
            frame = NULL;
            if (failed) {
                Py_DECREF(codes);
                return NULL;
            }
            break;
        }
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    Py_XDECREF(frame);
    PyObject *result = PyList_AsTuple(codes);
    Py_DECREF(codes);
    return result;
}

static PyObject *getframe; /* sys._getframe: walks to a depth without making frame objects */

static PyFrameObject *frame_at(Py_ssize_t depth)
{
    PyObject *n = PyLong_FromSsize_t(depth);
    if (n == NULL)
        return NULL;
    PyObject *frame = PyObject_CallOneArg(getframe, n);
    Py_DECREF(n);
    if (frame == NULL) {
        if (PyErr_ExceptionMatches(PyExc_ValueError))
            PyErr_Clear(); /* a shallower stack */
        return NULL;
    }
    return (PyFrameObject *)frame;
}

static int code_is(PyFrameObject *frame, PyObject *expected)
{
    PyCodeObject *code = PyFrame_GetCode(frame);
    int same = (PyObject *)code == expected;
    Py_DECREF(code);
    return same;
}

/* memo_key(depth, shortcut, bottom, anchor, limit) -> (shortcut, count, frames key) | None
 * bottom: callsite.py's record of the library frames a statement's text was last sent
 * through: (count, code of the first frame above them, code of the last of them, ...).
 * When the frames `depth` levels above the caller match it (two sys._getframe lookups), the
 * key of the frames from the first one above them out to `anchor`; None otherwise. */
static PyObject *memo_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) < 3
        || !PyFrame_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "memo_key(depth, shortcut, bottom, anchor, limit)");
        return NULL;
    }
    Py_ssize_t depth = PyLong_AsSsize_t(args[0]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    PyObject *bottom = args[2];
    Py_ssize_t count = PyLong_AsSsize_t(PyTuple_GET_ITEM(bottom, 0));
    if (count == -1 && PyErr_Occurred())
        return NULL;
    PyFrameObject *first = frame_at(depth + count);
    if (first == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!code_is(first, PyTuple_GET_ITEM(bottom, 1))) {
        Py_DECREF(first);
        Py_RETURN_NONE;
    }
    if (count) {
        PyFrameObject *last = frame_at(depth + count - 1);
        if (last == NULL) {
            Py_DECREF(first);
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        int same = code_is(last, PyTuple_GET_ITEM(bottom, 2));
        Py_DECREF(last);
        if (!same) {
            Py_DECREF(first);
            Py_RETURN_NONE;
        }
    }
    PyObject *walk_args[3] = {(PyObject *)first, args[3], args[4]};
    PyObject *frames = frames_key(self, walk_args, 3);
    Py_DECREF(first);
    if (frames == NULL || frames == Py_None)
        return frames;
    PyObject *key = PyTuple_Pack(3, args[1], PyTuple_GET_ITEM(bottom, 0), frames);
    Py_DECREF(frames);
    return key;
}

static PyMethodDef methods[] = {
    {"memo_key", (PyCFunction)(void (*)(void))memo_key, METH_FASTCALL,
     "memo_key(depth, shortcut, bottom, anchor, limit): (shortcut, count, frames key) for "
     "a statement sent through the library frames `bottom` records, None otherwise."},
    {"frames_key", (PyCFunction)(void (*)(void))frames_key, METH_FASTCALL,
     "frames_key(frame, anchor, limit): a hash of each frame's code and instruction from "
     "frame out to anchor, None if anchor is not within limit frames."},
    {"frame_codes", (PyCFunction)(void (*)(void))frame_codes, METH_FASTCALL,
     "frame_codes(frame, anchor, limit): the code objects frames_key reads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stackwalk",
    "The query doctor's per-statement stack key (see callsite.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__stackwalk(void)
{
    getframe = PySys_GetObject("_getframe");
    if (getframe == NULL) {
        PyErr_SetString(PyExc_ImportError, "sys._getframe is missing");
        return NULL;
    }
    Py_INCREF(getframe);
    return PyModule_Create(&module);
}
