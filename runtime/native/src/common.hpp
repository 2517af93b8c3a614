// Internal declarations of the native runtime (not installed; the C ABI is gdexport.h).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "gdexport.h"

namespace gdx {

// Every failure inside the library: a status for the C ABI and a message in the Python wording.
struct Failure : std::runtime_error {
  gdx_status status;
  Failure(gdx_status s, const std::string& m) : std::runtime_error(m), status(s) {}
};
[[noreturn]] inline void fail(gdx_status s, const std::string& m) { throw Failure(s, m); }

// -- json.cpp: a small JSON reader (what manifest.json needs) --------------------------------
struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool b = false;
  double num = 0;
  bool is_int = false;  // a number written without fraction or exponent (Python's int)
  int64_t i = 0;
  std::string str;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;  // in file order

  const Json* get(const std::string& key) const {
    for (const auto& kv : obj)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  static Json parse(const std::string& text);  // throws std::runtime_error with the position
  std::string repr() const;                    // Python-like repr for messages
};

// -- sha256.cpp -------------------------------------------------------------------------------
std::string sha256_file(const std::string& path);
std::string sha256_hex(const std::string& data);

// -- rng.cpp: numpy's default_rng (SeedSequence -> PCG64) and float32 ziggurat normals ----------
class Rng {
 public:
  explicit Rng(const std::vector<uint64_t>& entropy);  // default_rng([e0, e1, ...])
  uint64_t next64();
  uint32_t next32();
  float normal_f();                                     // standard_normal(dtype=float32)
  void normals(float* out, size_t count) {
    for (size_t k = 0; k < count; ++k) out[k] = normal_f();
  }
  int64_t integers(int64_t low, int64_t high);          // integers(low, high), high exclusive

 private:
  unsigned __int128 state_ = 0, inc_ = 0;
  bool has32_ = false;
  uint32_t buf32_ = 0;
  float next_float() { return static_cast<float>(next32() >> 8) * (1.0f / 16777216.0f); }
};

// -- schedule.cpp ------------------------------------------------------------------------------
struct Schedule {
  std::vector<double> betas, alphas_cumprod, alphas_cumprod_prev, sqrt_recip_alphas_cumprod,
      sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
      posterior_mean_coef1, posterior_mean_coef2;
  std::vector<int64_t> timestep_map;
  int size() const { return static_cast<int>(betas.size()); }
  static Schedule from_betas(const std::vector<double>& betas, const std::vector<int64_t>& tmap);
};
// Throw std::invalid_argument with the Python message on a bad spec.
Schedule make_schedule(const std::string& noise_schedule, int diffusion_steps,
                       const std::string& respacing);
Schedule truncate(const Schedule& s, int64_t max_t);

// -- manifest.cpp ------------------------------------------------------------------------------
struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;  // -1 for a named (dynamic) dim
};
struct Artifact {
  std::string file, role, precision, backend, sha256;
  std::vector<TensorSpec> inputs, outputs;
  int batch_min = 1, batch_opt = 1, batch_max = 1;
  const Json* entry = nullptr;  // the whole entry (extra keys such as tensorrt_version)
  const TensorSpec* input(const std::string& n) const {
    for (const auto& t : inputs)
      if (t.name == n) return &t;
    return nullptr;
  }
};
struct Diffusion {
  std::string noise_schedule;
  int diffusion_steps = 0;
  bool learn_sigma = false;
};
struct Component {
  bool present = false;
  int image_size = 0, num_classes = -1, low_res_size = 0;
  Diffusion diffusion;
};
struct Manifest {
  std::string folder, file;
  Json data;
  Component unet, classifier, upsampler;
  std::vector<Artifact> artifacts;
  // sampling defaults (absent / null: unset)
  bool has_scale = false;
  double scale = 0;
  std::string respacing, upsampler_respacing;
  int upsampler_start_t = -1;
  bool grayscale = false;

  static Manifest load(const std::string& build_dir);  // validates as runtime/manifest.py
  const Artifact* artifact(const std::string& role, const std::string& precision,
                           const std::string& backend) const;
  const Artifact* nearest(const std::string& role, const std::string& precision,
                          const std::string& backend) const;
  const Artifact& artifact_for_file(const std::string& name) const;
  std::string verify(const Artifact& a) const;  // confined path, exists, sha256 matches
};

// -- engines ----------------------------------------------------------------------------------
struct Feed {
  std::string name;
  std::string dtype;            // "float32" or "int64"
  std::vector<int64_t> shape;
  const void* data;
};
class Engine {
 public:
  virtual ~Engine() = default;
  // outputs[0] (the artefact's single output) into `out`, resized to fit.
  virtual void run(const std::vector<Feed>& feeds, std::vector<float>& out) = 0;
};
std::unique_ptr<Engine> open_openvino(const std::string& path, const Artifact& a,
                                      const std::string& device, int threads);
std::unique_ptr<Engine> open_tensorrt(const std::string& path, const Artifact& a);
// Feeds against the artefact's specs: names, dtypes, static dims, batch range (check_feeds).
void check_feeds(const Artifact& a, const std::vector<Feed>& feeds);

}  // namespace gdx
