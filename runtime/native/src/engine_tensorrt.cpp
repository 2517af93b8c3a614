// The TensorRT engine (built with -DGDX_TENSORRT=ON): a build's .plan files through
// IRuntime::deserializeCudaEngine and IExecutionContext::enqueueV3 (TensorRT 10.3+ and 11, the
// name-based I/O API), host feeds copied to device buffers on one stream. Like
// runtime/backends/tensorrt.py, a plan is refused unless the manifest's recorded TensorRT
// release and GPU match this machine's: plans only run where they were built.
#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common.hpp"

namespace gdx {
namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last = msg ? msg : "";
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
  std::string last;
};

void cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    fail(GDX_ERR_ENGINE, std::string("CUDA ") + what + " failed: " + cudaGetErrorString(e));
}

std::string release_of(const std::string& v) {  // "10.3.0.26" -> "10.3.0"
  size_t dots = 0, k = 0;
  for (; k < v.size(); ++k)
    if (v[k] == '.' && ++dots == 3) break;
  return v.substr(0, k);
}

std::string json_str(const Json* entry, const char* key) {
  const Json* v = entry ? entry->get(key) : nullptr;
  if (!v) return "";
  if (v->type == Json::String) return v->str;
  if (v->type == Json::Number) return v->repr();
  return "";
}

// The plan's recorded TensorRT release and GPU against this process's (check_plan_matches).
void check_plan(const Artifact& a, const std::string& path) {
  const std::string trt = std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                          "." + std::to_string(NV_TENSORRT_PATCH);
  int device = 0;
  cuda(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop;
  cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  const std::string gpu = prop.name;
  const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  std::vector<std::string> problems;
  const std::string built = json_str(a.entry, "tensorrt_version");
  if (!built.empty() && release_of(built) != trt)
    problems.push_back("it was built with TensorRT " + built + ", this is TensorRT " + trt);
  const std::string built_cc = json_str(a.entry, "compute_capability");
  const std::string built_gpu = json_str(a.entry, "gpu_name");
  if (!built_cc.empty() && built_cc != cc)
    problems.push_back("it was built for compute capability " + built_cc + " (" +
                       (built_gpu.empty() ? "GPU not recorded" : built_gpu) + "), this GPU is a " + gpu +
                       " (compute capability " + cc + ")");
  else if (!built_gpu.empty() && built_gpu != gpu)
    problems.push_back("it was built on a " + built_gpu + ", this GPU is a " + gpu);
  if (!problems.empty()) {
    std::string m = "cannot run " + path + ": ";
    for (size_t k = 0; k < problems.size(); ++k) m += (k ? "; " : "") + problems[k];
    fail(GDX_ERR_ENGINE, m + ". Plans only run with the TensorRT release and GPU model they were built "
                             "for: rebuild the plans here with `gdexport build`");
  }
}

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    default: return 0;
  }
}

class TensorRtEngine final : public Engine {
 public:
  TensorRtEngine(const std::string& path, const Artifact& a) : artifact_(a) {
    check_plan(a, path);
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string blob = ss.str();
    runtime_ = nvinfer1::createInferRuntime(logger_);
    if (!runtime_) fail(GDX_ERR_ENGINE, "TensorRT: createInferRuntime failed");
    engine_ = runtime_->deserializeCudaEngine(blob.data(), blob.size());
    if (!engine_)
      fail(GDX_ERR_ENGINE, "TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "." +
                               std::to_string(NV_TENSORRT_MINOR) + " cannot deserialise " + path + " (" +
                               logger_.last + "): the file is corrupt or built by another version or "
                               "for another GPU; rebuild it");
    context_ = engine_->createExecutionContext();
    if (!context_) fail(GDX_ERR_ENGINE, "TensorRT: createExecutionContext failed for " + path);
    cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
    for (int k = 0; k < engine_->getNbIOTensors(); ++k) {
      const char* name = engine_->getIOTensorName(k);
      if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kOUTPUT) output_ = name;
    }
    if (!a.outputs.empty()) output_ = a.outputs[0].name;
  }
  ~TensorRtEngine() override {
    for (auto& b : buffers_) cudaFree(b.second.ptr);
    if (stream_) cudaStreamDestroy(stream_);
    delete context_;
    delete engine_;
    delete runtime_;
  }

  void run(const std::vector<Feed>& feeds, std::vector<float>& out) override {
    check_feeds(artifact_, feeds);
    for (const auto& f : feeds) {
      nvinfer1::Dims d;
      d.nbDims = static_cast<int32_t>(f.shape.size());
      size_t count = 1;
      for (size_t k = 0; k < f.shape.size(); ++k) {
        d.d[k] = f.shape[k];
        count *= static_cast<size_t>(f.shape[k]);
      }
      if (!context_->setInputShape(f.name.c_str(), d))
        fail(GDX_ERR_ENGINE, "TensorRT refused the shape of input '" + f.name + "' (" + logger_.last + ")");
      const size_t bytes = count * (f.dtype == "int64" ? 8 : 4);
      void* dev = device(f.name, bytes);
      cuda(cudaMemcpyAsync(dev, f.data, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
      context_->setTensorAddress(f.name.c_str(), dev);
    }
    const nvinfer1::Dims od = context_->getTensorShape(output_.c_str());
    size_t count = 1;
    for (int k = 0; k < od.nbDims; ++k) count *= static_cast<size_t>(od.d[k]);
    const nvinfer1::DataType ot = engine_->getTensorDataType(output_.c_str());
    if (ot != nvinfer1::DataType::kFLOAT)
      fail(GDX_ERR_ENGINE, artifact_.file + ": output '" + output_ + "' is not float32");
    void* dev_out = device(output_, count * element_size(ot));
    context_->setTensorAddress(output_.c_str(), dev_out);
    if (!context_->enqueueV3(stream_))
      fail(GDX_ERR_ENGINE, "TensorRT enqueueV3 failed on " + artifact_.file + " (" + logger_.last + ")");
    out.resize(count);
    cuda(cudaMemcpyAsync(out.data(), dev_out, count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
         "cudaMemcpyAsync");
    cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  // A device buffer per tensor, grown as batches grow.
  void* device(const std::string& name, size_t bytes) {
    Buffer& b = buffers_[name];
    if (b.bytes < bytes) {
      cudaFree(b.ptr);
      b.ptr = nullptr;
      cuda(cudaMalloc(&b.ptr, bytes), "cudaMalloc");
      b.bytes = bytes;
    }
    return b.ptr;
  }

  Artifact artifact_;
  Logger logger_;
  nvinfer1::IRuntime* runtime_ = nullptr;
  nvinfer1::ICudaEngine* engine_ = nullptr;
  nvinfer1::IExecutionContext* context_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::string output_;
  std::map<std::string, Buffer> buffers_;
};

}  // namespace

std::unique_ptr<Engine> open_tensorrt(const std::string& path, const Artifact& a) {
  return std::make_unique<TensorRtEngine>(path, a);
}

}  // namespace gdx
