// gdexport native runtime: a header-only C++ wrapper over the C ABI (RAII, exceptions).
//
//   gdx::Runtime rt("build/");
//   std::vector<uint8_t> images = rt.sample({1, 2, 3}, /*scale=*/4.0, "ddim25", /*seed=*/0);
#ifndef GDEXPORT_HPP_
#define GDEXPORT_HPP_

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "gdexport.h"

namespace gdx {

class Error : public std::runtime_error {
 public:
  Error(gdx_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  gdx_status status() const { return status_; }

 private:
  gdx_status status_;
};

inline void check(gdx_status status) {
  if (status != GDX_OK) throw Error(status, gdx_last_error());
}

class Runtime {
 public:
  explicit Runtime(const std::string& build_dir, const gdx_options* options = nullptr) {
    check(gdx_open(build_dir.c_str(), options, &rt_));
  }
  ~Runtime() { gdx_close(rt_); }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
  Runtime(Runtime&& o) noexcept : rt_(o.rt_) { o.rt_ = nullptr; }
  Runtime& operator=(Runtime&& o) noexcept {
    if (this != &o) {
      gdx_close(rt_);
      rt_ = o.rt_;
      o.rt_ = nullptr;
    }
    return *this;
  }

  int image_size() const { return gdx_image_size(rt_); }
  int base_image_size() const { return gdx_base_image_size(rt_); }
  bool has_upsampler() const { return gdx_has_upsampler(rt_) != 0; }
  bool has_classifier() const { return gdx_has_classifier(rt_) != 0; }
  int num_classes() const { return gdx_num_classes(rt_); }
  int batch_max() const { return gdx_batch_max(rt_); }
  double default_scale() const { return gdx_default_scale(rt_); }

  // (N, S, S, 3) uint8 images, one per label; scale < 0 and empty steps take the manifest's.
  std::vector<uint8_t> sample(const std::vector<int64_t>& labels, double scale = -1,
                              const std::string& steps = "", uint64_t seed = 0,
                              int64_t first_index = 0) {
    const size_t s = static_cast<size_t>(image_size());
    std::vector<uint8_t> out(labels.size() * s * s * 3);
    check(gdx_sample(rt_, labels.data(), static_cast<int>(labels.size()), scale,
                     steps.empty() ? nullptr : steps.c_str(), seed, first_index, out.data()));
    return out;
  }

  // The full form (see gdx_sample_ex); returns the images, fills labels when given.
  std::vector<uint8_t> sample(const gdx_sample_params& params, std::vector<int64_t>* labels = nullptr) {
    const bool up = params.upsample && has_upsampler();
    const size_t s = static_cast<size_t>(up ? image_size() : base_image_size());
    std::vector<uint8_t> out(static_cast<size_t>(params.n) * s * s * 3);
    if (labels) labels->assign(static_cast<size_t>(params.n), 0);
    check(gdx_sample_ex(rt_, &params, out.data(), labels ? labels->data() : nullptr, nullptr,
                        nullptr));
    return out;
  }

  gdx_runtime* get() const { return rt_; }

 private:
  gdx_runtime* rt_ = nullptr;
};

}  // namespace gdx
#endif  // GDEXPORT_HPP_
