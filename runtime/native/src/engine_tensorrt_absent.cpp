// Built without -DGDX_TENSORRT=ON: the TensorRT engine says how to get it.
#include "common.hpp"

namespace gdx {
std::unique_ptr<Engine> open_tensorrt(const std::string& path, const Artifact&) {
  fail(GDX_ERR_ENGINE, "cannot open " + path + ": this gdexport runtime was built without "
                       "TensorRT; rebuild it with `cmake -DGDX_TENSORRT=ON` where TensorRT and "
                       "CUDA are installed, or use the openvino engine on the build's ONNX files");
}
}  // namespace gdx
