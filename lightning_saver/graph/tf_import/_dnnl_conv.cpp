// A float32 2-D convolution through oneDNN's C++ API, its primitive created once per shape.
//
// torch's `torch.ops.mkldnn._convolution_pointwise` rebuilds oneDNN's primitive descriptor on every
// call (20-40 us hot, 60-160 us inside a network, outside the convolution itself); here the primitive
// and the filter, reordered into the layout the primitive chose, are made once, when a prepared
// shape is built, and each `run(src, dst)` only wraps the two addresses and executes, the GIL
// released. Optional: built only where oneDNN's headers exist (setup.py); conv_kernels.py goes on
// without it.
//
// Conv(shape, nhwc, weight, groups, bias, strides, dilations, pads_before, pads_after, act, sum):
//   shape     (N, C, H, W) of the input, in NCHW terms whatever the layout;
//   nhwc      True: src and dst are NHWC (channels-last); False: NCHW;
//   weight    a C-contiguous float32 buffer, [O, C / groups, KH, KW] (torch's layout);
//   bias      a float32 buffer of O values, or None;
//   strides, dilations  2 ints each, dilation 1 = none (TF's and torch's count);
//   pads_before, pads_after  2 ints each: asymmetric padding is native to oneDNN;
//   act       "none", "relu" or "relu6";
//   sum       True: dst = act(conv(src) + dst), the residual already in dst.
// Read-only attributes: out_shape (N, O, OH, OW) and impl (oneDNN's implementation's name).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dnnl.hpp>

#include <cstdint>
#include <cstring>
#include <memory>
#include <exception>
#include <new>
#include <string>

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine &cpu() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

dnnl::stream &thread_stream() {  // one per thread: streams are not shared between threads
    thread_local dnnl::stream stream(cpu());
    return stream;
}

struct State {
    memory::desc src, dst;
    dnnl::convolution_forward primitive;
    memory weights;  // in the primitive's layout; read only once made, so shared by every call
    memory bias;     // empty without a bias
    bool has_bias = false;
    memory::desc scratchpad;  // the user-mode scratchpad each call passes (see thread_scratchpad)
};

// The calling thread's scratchpad, grown to `bytes`, 64-byte aligned. oneDNN's library-managed
// scratchpad is shared by all primitives of a default build and binds each primitive to the thread
// that made it ("cannot migrate between threads"); a graph made on one thread and run on others, or
// on two at once, would share it. In user mode each call brings its own: one buffer per thread,
// which runs one convolution at a time (run never calls back into Python while executing).
void *thread_scratchpad(size_t bytes) {
    thread_local std::unique_ptr<char[]> buffer;
    thread_local size_t size = 0;
    if (bytes + 64 > size) {
        buffer.reset(new char[bytes + 64]);
        size = bytes + 64;
    }
    auto address = reinterpret_cast<std::uintptr_t>(buffer.get());
    return reinterpret_cast<void *>((address + 63) & ~static_cast<std::uintptr_t>(63));
}

struct Conv {
    PyObject_HEAD
    State *state;
    PyObject *out_shape;
    PyObject *impl;
};

bool read_pair(PyObject *seq, const char *what, memory::dim out[2]) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == nullptr) return false;
    bool ok = PySequence_Fast_GET_SIZE(fast) == 2;
    for (Py_ssize_t i = 0; ok && i < 2; ++i) {
        out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        ok = !(out[i] == -1 && PyErr_Occurred());
    }
    Py_DECREF(fast);
    if (!ok && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "_dnnl_conv.Conv: %s must hold 2 ints", what);
    return ok;
}

// A C-contiguous float32 buffer of exactly `count` values, released by the caller.
bool read_floats(PyObject *obj, const char *what, Py_ssize_t count, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return false;
    if (view->itemsize != 4 || view->format == nullptr || std::strcmp(view->format, "f") != 0 ||
        view->len != count * 4) {
        PyErr_Format(PyExc_ValueError,
                     "_dnnl_conv.Conv: %s must be %zd contiguous float32 values, found %zd bytes of format '%s'",
                     what, count, view->len, view->format == nullptr ? "?" : view->format);
        PyBuffer_Release(view);
        return false;
    }
    return true;
}

PyObject *Conv_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static const char *names[] = {"shape", "nhwc", "weight", "groups", "bias", "strides", "dilations",
                                  "pads_before", "pads_after", "act", "sum", nullptr};
    PyObject *shape_obj, *weight_obj, *bias_obj, *strides_obj, *dilations_obj, *before_obj, *after_obj;
    int nhwc, sum;
    long long groups;
    const char *act;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OpOLOOOOOsp", const_cast<char **>(names), &shape_obj,
                                     &nhwc, &weight_obj, &groups, &bias_obj, &strides_obj, &dilations_obj,
                                     &before_obj, &after_obj, &act, &sum))
        return nullptr;
    PyObject *fast = PySequence_Fast(shape_obj, "shape");
    if (fast == nullptr) return nullptr;
    memory::dim nchw[4] = {0, 0, 0, 0};
    bool ok = PySequence_Fast_GET_SIZE(fast) == 4;
    for (Py_ssize_t i = 0; ok && i < 4; ++i) {
        nchw[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        ok = nchw[i] > 0;
    }
    Py_DECREF(fast);
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_dnnl_conv.Conv: shape must be 4 positive ints");
        return nullptr;
    }
    memory::dim kernel_hw[2] = {0, 0}, strides[2], dilations[2], before[2], after[2];
    if (!read_pair(strides_obj, "strides", strides) || !read_pair(dilations_obj, "dilations", dilations) ||
        !read_pair(before_obj, "pads_before", before) || !read_pair(after_obj, "pads_after", after))
        return nullptr;
    std::string activation(act);
    if (activation != "none" && activation != "relu" && activation != "relu6") {
        PyErr_Format(PyExc_ValueError, "_dnnl_conv.Conv: act must be 'none', 'relu' or 'relu6', found '%s'", act);
        return nullptr;
    }
    if (groups < 1 || nchw[1] % groups != 0) {
        PyErr_Format(PyExc_ValueError, "_dnnl_conv.Conv: %lld groups do not divide %lld input channels", groups,
                     static_cast<long long>(nchw[1]));
        return nullptr;
    }
    // the filter's shape from its buffer: [O, C / groups, KH, KW], KH and KW from the buffer's shape
    Py_buffer wview;
    if (PyObject_GetBuffer(weight_obj, &wview, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) != 0) return nullptr;
    if (wview.ndim != 4 || wview.shape[1] != nchw[1] / groups || wview.shape[0] % groups != 0) {
        PyErr_Format(PyExc_ValueError,
                     "_dnnl_conv.Conv: weight must be [O, C / groups = %lld, KH, KW] with O a multiple of %lld, "
                     "found %d dimensions", static_cast<long long>(nchw[1] / groups), groups, wview.ndim);
        PyBuffer_Release(&wview);
        return nullptr;
    }
    memory::dim out_c = wview.shape[0];
    kernel_hw[0] = wview.shape[2];
    kernel_hw[1] = wview.shape[3];
    PyBuffer_Release(&wview);
    Py_buffer weights, bias;
    if (!read_floats(weight_obj, "weight", out_c * (nchw[1] / groups) * kernel_hw[0] * kernel_hw[1], &weights))
        return nullptr;
    bool has_bias = bias_obj != Py_None;
    if (has_bias && !read_floats(bias_obj, "bias", out_c, &bias)) {
        PyBuffer_Release(&weights);
        return nullptr;
    }
    memory::dim out_hw[2];
    for (int i = 0; i < 2; ++i) {
        if (strides[i] < 1 || dilations[i] < 1 || before[i] < 0 || after[i] < 0) ok = false;
        out_hw[i] = (nchw[2 + i] + before[i] + after[i] - dilations[i] * (kernel_hw[i] - 1) - 1) / strides[i] + 1;
        if (out_hw[i] < 1) ok = false;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_dnnl_conv.Conv: strides and dilations must be >= 1, pads >= 0, "
                                          "and the output must not be empty");
        PyBuffer_Release(&weights);
        if (has_bias) PyBuffer_Release(&bias);
        return nullptr;
    }
    Conv *self = reinterpret_cast<Conv *>(type->tp_alloc(type, 0));
    if (self == nullptr) {
        PyBuffer_Release(&weights);
        if (has_bias) PyBuffer_Release(&bias);
        return nullptr;
    }
    std::string failure;
    try {
        auto &engine = cpu();
        tag layout = nhwc ? tag::nhwc : tag::nchw;
        memory::dims src_dims = {nchw[0], nchw[1], nchw[2], nchw[3]};
        memory::dims dst_dims = {nchw[0], out_c, out_hw[0], out_hw[1]};
        memory::dims w_dims = groups == 1
            ? memory::dims{out_c, nchw[1], kernel_hw[0], kernel_hw[1]}
            : memory::dims{groups, out_c / groups, nchw[1] / groups, kernel_hw[0], kernel_hw[1]};
        memory::desc src(src_dims, dt::f32, layout), dst(dst_dims, dt::f32, layout);
        memory::desc w_any(w_dims, dt::f32, tag::any), b_md({out_c}, dt::f32, tag::x);
        memory::dims strides_v = {strides[0], strides[1]};
        memory::dims dilations_v = {dilations[0] - 1, dilations[1] - 1};  // oneDNN counts from 0
        memory::dims before_v = {before[0], before[1]}, after_v = {after[0], after[1]};
        auto desc = has_bias
            ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                              dnnl::algorithm::convolution_direct, src, w_any, b_md, dst,
                                              strides_v, dilations_v, before_v, after_v)
            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                              dnnl::algorithm::convolution_direct, src, w_any, dst,
                                              strides_v, dilations_v, before_v, after_v);
        dnnl::post_ops ops;
        if (sum) ops.append_sum(1.f);
        if (activation == "relu") ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
        if (activation == "relu6") ops.append_eltwise(1.f, dnnl::algorithm::eltwise_clip, 0.f, 6.f);
        dnnl::primitive_attr attr;
        attr.set_post_ops(ops);
        attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
        dnnl::convolution_forward::primitive_desc pd(desc, attr, engine);
        auto state = new State{src, dst, dnnl::convolution_forward(pd), memory(pd.weights_desc(), engine),
                               memory(), has_bias, pd.scratchpad_desc()};
        self->state = state;
        memory user(memory::desc(w_dims, dt::f32, groups == 1 ? tag::oihw : tag::goihw), engine, weights.buf);
        dnnl::stream stream(engine);
        dnnl::reorder(user, state->weights).execute(stream, user, state->weights);
        if (has_bias) {
            state->bias = memory(b_md, engine);
            std::memcpy(state->bias.get_data_handle(), bias.buf, out_c * sizeof(float));
        }
        stream.wait();
        self->out_shape = Py_BuildValue("(LLLL)", static_cast<long long>(nchw[0]), static_cast<long long>(out_c),
                                        static_cast<long long>(out_hw[0]), static_cast<long long>(out_hw[1]));
        self->impl = PyUnicode_FromString(pd.impl_info_str());
    } catch (const dnnl::error &e) {
        failure = e.what();
    } catch (const std::exception &e) {
        failure = e.what();
    }
    PyBuffer_Release(&weights);
    if (has_bias) PyBuffer_Release(&bias);
    if (!failure.empty() || self->out_shape == nullptr || self->impl == nullptr) {
        if (!failure.empty())
            PyErr_Format(PyExc_RuntimeError,
                         "_dnnl_conv.Conv: oneDNN could not make a convolution of input (%lld, %lld, %lld, %lld) %s "
                         "with a %lldx%lld filter to %lld channels in %lld groups: %s",
                         static_cast<long long>(nchw[0]), static_cast<long long>(nchw[1]),
                         static_cast<long long>(nchw[2]), static_cast<long long>(nchw[3]), nhwc ? "NHWC" : "NCHW",
                         static_cast<long long>(kernel_hw[0]), static_cast<long long>(kernel_hw[1]),
                         static_cast<long long>(out_c), groups, failure.c_str());
        Py_DECREF(self);
        return nullptr;
    }
    return reinterpret_cast<PyObject *>(self);
}

void Conv_dealloc(Conv *self) {
    delete self->state;
    Py_XDECREF(self->out_shape);
    Py_XDECREF(self->impl);
    Py_TYPE(self)->tp_free(reinterpret_cast<PyObject *>(self));
}

// run(src_address, dst_address): the convolution of the float32 data at src into dst (summed into what
// dst holds when made with sum=True). The caller keeps both buffers alive and of the made shapes.
PyObject *Conv_run(Conv *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "_dnnl_conv.Conv.run takes (src_address, dst_address), found %zd arguments",
                     nargs);
        return nullptr;
    }
    void *src = PyLong_AsVoidPtr(args[0]);
    if (src == nullptr && PyErr_Occurred()) return nullptr;
    void *dst = PyLong_AsVoidPtr(args[1]);
    if (dst == nullptr && PyErr_Occurred()) return nullptr;
    if (src == nullptr || dst == nullptr) {
        PyErr_SetString(PyExc_ValueError, "_dnnl_conv.Conv.run: a null address");
        return nullptr;
    }
    State *state = self->state;
    std::string failure;
    Py_BEGIN_ALLOW_THREADS
    try {
        auto &engine = cpu();
        auto &stream = thread_stream();
        memory src_m(state->src, engine, src), dst_m(state->dst, engine, dst);  // this call's own handles
        memory scratch_m(state->scratchpad, engine, thread_scratchpad(state->scratchpad.get_size()));
        if (state->has_bias)
            state->primitive.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, state->weights},
                                              {DNNL_ARG_BIAS, state->bias}, {DNNL_ARG_DST, dst_m},
                                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
        else
            state->primitive.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, state->weights},
                                              {DNNL_ARG_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
        stream.wait();
    } catch (const std::exception &e) {
        failure = e.what();
    } catch (...) {
        failure = "an unknown C++ exception";
    }
    Py_END_ALLOW_THREADS
    if (!failure.empty()) {
        PyErr_Format(PyExc_RuntimeError, "_dnnl_conv.Conv.run: oneDNN's convolution failed: %s", failure.c_str());
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyObject *Conv_out_shape(Conv *self, void *) {
    Py_INCREF(self->out_shape);
    return self->out_shape;
}

PyObject *Conv_impl(Conv *self, void *) {
    Py_INCREF(self->impl);
    return self->impl;
}

PyMethodDef Conv_methods[] = {
    {"run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(Conv_run)), METH_FASTCALL,
     "run(src_address, dst_address): execute the convolution, the GIL released."},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef Conv_getset[] = {
    {"out_shape", reinterpret_cast<getter>(Conv_out_shape), nullptr, "(N, O, OH, OW)", nullptr},
    {"impl", reinterpret_cast<getter>(Conv_impl), nullptr, "oneDNN's implementation", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject ConvType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_dnnl_conv",
                          "A float32 convolution through oneDNN, its primitive made once.", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__dnnl_conv(void) {
    ConvType.tp_name = "lightning_saver.graph.tf_import._dnnl_conv.Conv";
    ConvType.tp_basicsize = sizeof(Conv);
    ConvType.tp_flags = Py_TPFLAGS_DEFAULT;
    ConvType.tp_doc = "A float32 2-D convolution through oneDNN, its primitive and filter made once.";
    ConvType.tp_new = Conv_new;
    ConvType.tp_dealloc = reinterpret_cast<destructor>(Conv_dealloc);
    ConvType.tp_methods = Conv_methods;
    ConvType.tp_getset = Conv_getset;
    if (PyType_Ready(&ConvType) < 0) return nullptr;
    PyObject *module = PyModule_Create(&module_def);
    if (module == nullptr) return nullptr;
    Py_INCREF(&ConvType);
    if (PyModule_AddObject(module, "Conv", reinterpret_cast<PyObject *>(&ConvType)) < 0) {
        Py_DECREF(&ConvType);
        Py_DECREF(module);
        return nullptr;
    }
    return module;
}
