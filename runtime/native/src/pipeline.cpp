// The runtime behind the C ABI: a build's engines and the guided loop over them, base model
// then upsampler, as runtime/pipeline.py (same defaults, checks, messages and noise streams).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "common.hpp"
#include "sampling.hpp"

namespace gdx {
namespace {

// Separate generator streams per sample (runtime/pipeline.py), so a stage never shifts another's.
constexpr int64_t kStreamBase = 0, kStreamLabel = 1, kStreamUp = 2;

std::vector<Rng> sample_rngs(uint64_t seed, int64_t first, int count, int64_t stream) {
  std::vector<Rng> r;
  r.reserve(count);
  for (int j = 0; j < count; ++j)
    r.emplace_back(std::vector<uint64_t>{seed, static_cast<uint64_t>(first + j), static_cast<uint64_t>(stream)});
  return r;
}

void stacked_normal(std::vector<Rng>& rngs, size_t per_sample, std::vector<float>& out) {
  out.resize(rngs.size() * per_sample);
  for (size_t b = 0; b < rngs.size(); ++b) rngs[b].normals(out.data() + b * per_sample, per_sample);
}

// (B, C, H, W): every channel set to the channel mean (a grey-trained family).
void to_grey(std::vector<float>& x, int batch, int channels, size_t plane) {
  for (int b = 0; b < batch; ++b)
    for (size_t q = 0; q < plane; ++q) {
      float sum = 0;
      for (int c = 0; c < channels; ++c) sum += x[(b * channels + c) * plane + q];
      const float mean = sum / static_cast<float>(channels);
      for (int c = 0; c < channels; ++c) x[(b * channels + c) * plane + q] = mean;
    }
}

// torch's bilinear interpolate (align_corners=False), as runtime/images.resize_bilinear.
std::vector<float> resize_bilinear(const std::vector<float>& x, int bc, int h, int w, int H, int W) {
  auto taps = [](int n_in, int n_out, std::vector<int>& lo, std::vector<int>& hi, std::vector<float>& f) {
    for (int k = 0; k < n_out; ++k) {
      double src = (k + 0.5) * (static_cast<double>(n_in) / n_out) - 0.5;
      src = std::max(src, 0.0);
      int l = std::min(static_cast<int>(std::floor(src)), n_in - 1);
      lo.push_back(l);
      hi.push_back(std::min(l + 1, n_in - 1));
      f.push_back(static_cast<float>(src - l));
    }
  };
  std::vector<int> h0, h1, w0, w1;
  std::vector<float> fh, fw;
  taps(h, H, h0, h1, fh);
  taps(w, W, w0, w1, fw);
  std::vector<float> rows(size_t(bc) * H * w), out(size_t(bc) * H * W);
  for (int p = 0; p < bc; ++p)
    for (int r = 0; r < H; ++r)
      for (int c = 0; c < w; ++c)
        rows[(size_t(p) * H + r) * w + c] = x[(size_t(p) * h + h0[r]) * w + c] * (1.0f - fh[r]) +
                                            x[(size_t(p) * h + h1[r]) * w + c] * fh[r];
  for (int p = 0; p < bc; ++p)
    for (int r = 0; r < H; ++r)
      for (int c = 0; c < W; ++c)
        out[(size_t(p) * H + r) * W + c] = rows[(size_t(p) * H + r) * w + w0[c]] * (1.0f - fw[c]) +
                                           rows[(size_t(p) * H + r) * w + w1[c]] * fw[c];
  return out;
}

// (B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8, truncating like the original.
void to_uint8(const float* x, int batch, int channels, int H, int W, uint8_t* out) {
  const size_t plane = size_t(H) * W;
  for (int b = 0; b < batch; ++b)
    for (size_t q = 0; q < plane; ++q)
      for (int c = 0; c < channels; ++c) {
        float v = (x[(size_t(b) * channels + c) * plane + q] + 1.0f) * 127.5f;
        v = std::min(255.0f, std::max(0.0f, v));
        out[(size_t(b) * plane + q) * channels + c] = static_cast<uint8_t>(v);
      }
}

[[noreturn]] void bad_arg(const std::string& m) { fail(GDX_ERR_ARGUMENT, m); }

}  // namespace

struct Stage {
  const Artifact* artifact = nullptr;
  std::unique_ptr<Engine> engine;
  bool has_y = false;
  explicit operator bool() const { return engine != nullptr; }
};

struct RuntimeImpl {
  std::unique_ptr<Manifest> manifest;
  Stage unet, clf, up;

  int num_classes() const {
    if (manifest->unet.num_classes >= 0) return manifest->unet.num_classes;
    if (clf && manifest->classifier.present) return manifest->classifier.num_classes;
    return -1;
  }
  int batch_max() const {
    int b = unet.artifact->batch_max;
    if (clf) b = std::min(b, clf.artifact->batch_max);
    if (up) b = std::min(b, up.artifact->batch_max);
    return b;
  }
  double default_scale() const { return clf && manifest->has_scale ? manifest->scale : 0.0; }
  std::string steps_or_default(const char* steps) const {
    if (steps) return steps;
    return manifest->respacing.empty() ? "250" : manifest->respacing;
  }
  Schedule base_schedule(const std::string& steps) const {
    try {
      return make_schedule(manifest->unet.diffusion.noise_schedule,
                           manifest->unet.diffusion.diffusion_steps, steps);
    } catch (const std::invalid_argument& e) {
      bad_arg("--steps '" + steps + "': " + e.what());
    }
  }

  void open(const std::string& dir, const gdx_options& o) {
    manifest = std::make_unique<Manifest>(Manifest::load(dir));
    const Manifest& m = *manifest;
    if (!m.unet.present)
      fail(GDX_ERR_MANIFEST, "the build in " + m.folder + " has no UNet; export one first");
    const std::string engine = o.engine ? o.engine : "openvino";
    std::string backend;
    if (engine == "openvino") backend = "onnxruntime";  // the ONNX artefacts
    else if (engine == "tensorrt") backend = "tensorrt";
    else bad_arg("unknown engine '" + engine + "': use openvino or tensorrt");
    const std::string precision = o.precision ? o.precision : "";
    const Artifact* ua = nullptr;
    if (o.unet_file) {
      ua = &m.artifact_for_file(o.unet_file);
      if (ua->role != "unet") fail(GDX_ERR_MANIFEST, ua->file + " is a " + ua->role + " engine, not the UNet");
    } else {
      ua = m.artifact("unet", precision, backend);
      if (!ua)
        fail(GDX_ERR_MANIFEST, "the build in " + m.folder + " has no UNet artefact for the " + engine +
                                   " engine (backend " + backend +
                                   (precision.empty() ? "" : ", precision " + precision) +
                                   "): build one with `gdexport build`");
    }
    if (ua->backend != backend)
      fail(GDX_ERR_MANIFEST, ua->file + " is a " + ua->backend + " artefact; the " + engine +
                                 " engine runs " + backend + " artefacts");
    const std::string device = o.device ? o.device : "CPU";
    auto open_stage = [&](const Artifact* a, Stage& s) {
      if (!a) return;
      const std::string path = m.verify(*a);
      s.artifact = a;
      s.engine = engine == "openvino" ? open_openvino(path, *a, device, o.threads) : open_tensorrt(path, *a);
      s.has_y = a->input("y") != nullptr;
    };
    open_stage(ua, unet);
    if (!o.no_classifier) open_stage(m.nearest("classifier_grad", ua->precision, ua->backend), clf);
    if (!o.no_upsampler) open_stage(m.nearest("upsampler", ua->precision, ua->backend), up);
    // A stage's artefact on another backend (nearest's last resort) cannot run here.
    for (Stage* s : {&clf, &up})
      if (*s && s->artifact->backend != backend)
        fail(GDX_ERR_MANIFEST, s->artifact->file + " is a " + s->artifact->backend +
                                   " artefact; the " + engine + " engine runs " + backend + " artefacts");
  }

  std::vector<int64_t> drawn_labels(int n_classes, uint64_t seed, int64_t first, int n) const {
    auto rngs = sample_rngs(seed, first, n, kStreamLabel);
    std::vector<int64_t> out;
    for (auto& r : rngs) out.push_back(r.integers(0, n_classes));
    return out;
  }

  void sample(const gdx_sample_params& p, uint8_t* out_images, int64_t* out_labels,
              float* out_base, float* out_traj) {
    const Manifest& m = *manifest;
    const std::string sampler = p.sampler ? p.sampler : "ddim";
    if (sampler != "ddim" && sampler != "ddpm")
      bad_arg("sampler must be one of ('ddim', 'ddpm'), got '" + sampler + "'");
    if (p.first_index < 0) bad_arg("first_index must be >= 0, got " + std::to_string(p.first_index));
    if (!std::isfinite(p.eta) || p.eta < 0 || p.eta > 1)
      bad_arg("eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise), got " + std::to_string(p.eta));
    if (std::isnan(p.scale) || std::isinf(p.scale)) bad_arg("scale must be a finite number");
    const double scale = p.scale < 0 ? default_scale() : p.scale;
    if (scale != 0 && !clf)
      bad_arg("guidance scale " + std::to_string(scale) +
              " needs a classifier: pass --classifier (the build's classifier_grad engine) or use --scale 0");
    if (p.n < 1) bad_arg("num_samples must be >= 1, got " + std::to_string(p.n));
    if (!out_images) bad_arg("out_images is NULL: pass a buffer of n * S * S * 3 bytes");
    const int n = p.n, n_classes = num_classes();
    std::vector<int64_t> labels;
    bool have_labels = false;
    if (p.labels) {
      if (n_classes < 0) bad_arg("labels given, but neither the model nor a classifier has classes");
      labels.assign(p.labels, p.labels + n);
      for (int64_t l : labels)
        if (l < 0 || l >= n_classes)
          bad_arg("class " + std::to_string(l) + " is out of range: this build has classes 0.." +
                  std::to_string(n_classes - 1));
      have_labels = true;
    } else if (n_classes >= 0) {
      labels = drawn_labels(n_classes, p.seed, p.first_index, n);
      have_labels = true;
    }
    if (scale != 0 && !have_labels) bad_arg("classifier guidance needs labels");
    const int bmax = batch_max();
    const int batch = p.batch == 0 ? std::min(n, bmax) : p.batch;
    if (batch < 1 || batch > bmax)
      bad_arg("batch " + std::to_string(batch) + " is outside the engines' range 1.." + std::to_string(bmax));
    const std::string steps = steps_or_default(p.steps);
    const Schedule schedule = base_schedule(steps);
    const int size = m.unet.image_size, C = 3;
    const size_t chw = size_t(C) * size * size;

    // The upsampler stage's plan.
    const bool cascade = p.upsample && up;
    Schedule up_schedule;
    int start_t = 0, up_size = 0;
    std::vector<int64_t> up_labels;
    bool up_has_labels = false;
    if (cascade) {
      const Diffusion& ud = m.upsampler.diffusion;
      const std::string up_steps = !m.upsampler_respacing.empty() ? m.upsampler_respacing : steps;
      try {
        up_schedule = make_schedule(ud.noise_schedule, ud.diffusion_steps, up_steps);
      } catch (const std::invalid_argument& e) {
        bad_arg("upsampler steps '" + up_steps + "': " + e.what());
      }
      start_t = p.upsampler_start_t >= 0 ? p.upsampler_start_t : std::max(m.upsampler_start_t, 0);
      if (start_t >= ud.diffusion_steps)
        bad_arg("upsampler start timestep " + std::to_string(start_t) + " is past the upsampler's " +
                std::to_string(ud.diffusion_steps) + " diffusion steps: use 0.." +
                std::to_string(ud.diffusion_steps - 1) + " (0 = the whole chain from noise)");
      if (start_t) {
        try {
          up_schedule = truncate(up_schedule, start_t);
        } catch (const std::invalid_argument& e) {
          bad_arg(std::string("upsampler start: ") + e.what());
        }
      }
      up_size = m.upsampler.image_size;
      if (up.has_y) {
        const int n_up = m.upsampler.num_classes;
        if (!have_labels && n_up > 0) {
          labels = drawn_labels(n_up, p.seed, p.first_index, n);
          have_labels = true;
        } else if (n_up > 0) {
          for (int64_t l : labels)
            if (l >= n_up)
              bad_arg("class " + std::to_string(l) + " is out of the upsampler's range 0.." + std::to_string(n_up - 1));
        }
        up_labels = labels;
        up_has_labels = true;
      }
    }
    const int final_size = cascade ? up_size : size;
    const size_t final_chw = size_t(C) * final_size * final_size;
    const int K = schedule.size();

    std::vector<float> x, low_res, feed_scale;
    for (int lo = 0; lo < n; lo += batch) {
      const int B = std::min(batch, n - lo);
      const int64_t first = p.first_index + lo;
      std::vector<int64_t> y;
      if (have_labels) y.assign(labels.begin() + lo, labels.begin() + lo + B);
      // Base stage.
      auto rngs = sample_rngs(p.seed, first, B, kStreamBase);
      stacked_normal(rngs, chw, x);
      NoiseFn noise = [&](int, std::vector<float>& z) { stacked_normal(rngs, chw, z); };
      ModelFn unet_fn = [&](const std::vector<float>& xx, const std::vector<int64_t>& t, std::vector<float>& out) {
        std::vector<Feed> feeds = {{"x", "float32", {B, C, size, size}, xx.data()},
                                   {"t", "int64", {B}, t.data()}};
        if (unet.has_y) feeds.push_back({"y", "int64", {B}, y.data()});
        unet.engine->run(feeds, out);
      };
      ModelFn grad_fn;
      if (scale != 0) {
        const TensorSpec* s = clf.artifact->input("scale");
        const bool per_sample = s && s->shape.size() == 1;
        feed_scale.assign(per_sample ? B : 1, static_cast<float>(scale));
        grad_fn = [&, per_sample](const std::vector<float>& xx, const std::vector<int64_t>& t, std::vector<float>& out) {
          std::vector<int64_t> sshape;
          if (per_sample) sshape.push_back(B);
          std::vector<Feed> feeds = {{"x", "float32", {B, C, size, size}, xx.data()},
                                     {"t", "int64", {B}, t.data()},
                                     {"y", "int64", {B}, y.data()},
                                     {"scale", "float32", sshape, feed_scale.data()}};
          clf.engine->run(feeds, out);
        };
      }
      StepFn record;
      if (out_traj)
        record = [&](int k, const std::vector<float>& xx) {
          for (int b = 0; b < B; ++b)
            std::memcpy(out_traj + (size_t(k) * n + lo + b) * chw, xx.data() + b * chw, chw * sizeof(float));
        };
      try {
        sample_loop(sampler, unet_fn, grad_fn, x, {B, C, size, size}, schedule,
                    m.unet.diffusion.learn_sigma, static_cast<float>(p.eta), noise, record);
      } catch (const Failure& f) {
        fail(f.status, std::string("unet stage: ") + f.what());
      }
      if (m.grayscale) to_grey(x, B, C, size_t(size) * size);
      if (out_base) std::memcpy(out_base + size_t(lo) * chw, x.data(), x.size() * sizeof(float));
      if (!cascade) {
        to_uint8(x.data(), B, C, size, size, out_images + size_t(lo) * final_chw);
        continue;
      }
      // Upsampler stage: SDEdit from the noised bilinear input when start_t > 0.
      low_res = x;
      std::vector<int64_t> uy;
      if (up_has_labels) uy.assign(up_labels.begin() + lo, up_labels.begin() + lo + B);
      auto urngs = sample_rngs(p.seed, first, B, kStreamUp);
      std::vector<float> ux;
      stacked_normal(urngs, final_chw, ux);
      if (start_t) {
        const double a = up_schedule.alphas_cumprod.back();
        std::vector<float> bil = resize_bilinear(low_res, B * C, size, size, up_size, up_size);
        for (size_t e = 0; e < ux.size(); ++e)
          ux[e] = static_cast<float>(std::sqrt(a) * bil[e] + std::sqrt(1 - a) * ux[e]);
      }
      NoiseFn unoise = [&](int, std::vector<float>& z) { stacked_normal(urngs, final_chw, z); };
      ModelFn up_fn = [&](const std::vector<float>& xx, const std::vector<int64_t>& t, std::vector<float>& out) {
        std::vector<Feed> feeds = {{"x", "float32", {B, C, up_size, up_size}, xx.data()},
                                   {"t", "int64", {B}, t.data()},
                                   {"low_res", "float32", {B, C, size, size}, low_res.data()}};
        if (up.has_y) feeds.push_back({"y", "int64", {B}, uy.data()});
        up.engine->run(feeds, out);
      };
      try {
        sample_loop(sampler, up_fn, ModelFn(), ux, {B, C, up_size, up_size}, up_schedule,
                    m.upsampler.diffusion.learn_sigma, static_cast<float>(p.eta), unoise, StepFn());
      } catch (const Failure& f) {
        fail(f.status, std::string("upsampler stage: ") + f.what());
      }
      if (m.grayscale) to_grey(ux, B, C, size_t(up_size) * up_size);
      to_uint8(ux.data(), B, C, up_size, up_size, out_images + size_t(lo) * final_chw);
    }
    if (out_labels) {
      for (int j = 0; j < n; ++j) out_labels[j] = have_labels ? labels[j] : -1;
    }
    (void)K;
  }
};

}  // namespace gdx

// -- the C ABI ---------------------------------------------------------------------------------

struct gdx_runtime {
  gdx::RuntimeImpl impl;
};

namespace {
thread_local std::string g_last_error;

template <class F>
gdx_status guarded(F&& f) {
  try {
    f();
    g_last_error.clear();
    return GDX_OK;
  } catch (const gdx::Failure& e) {
    g_last_error = e.what();
    return e.status;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return GDX_ERR_INTERNAL;
  } catch (const std::exception& e) {
    g_last_error = std::string("internal error: ") + e.what();
    return GDX_ERR_INTERNAL;
  } catch (...) {
    g_last_error = "internal error: unknown exception";
    return GDX_ERR_INTERNAL;
  }
}
}  // namespace

extern "C" {

gdx_sample_params gdx_default_params(void) {
  gdx_sample_params p;
  std::memset(&p, 0, sizeof p);
  p.scale = -1;
  p.sampler = "ddim";
  p.upsampler_start_t = -1;
  p.upsample = 1;
  return p;
}

const char* gdx_last_error(void) { return g_last_error.c_str(); }
const char* gdx_version(void) { return "0.1.0"; }

gdx_status gdx_open(const char* build_dir, const gdx_options* options, gdx_runtime** out) {
  return guarded([&] {
    if (!out) gdx::fail(GDX_ERR_ARGUMENT, "gdx_open: out is NULL");
    *out = nullptr;
    if (!build_dir) gdx::fail(GDX_ERR_ARGUMENT, "gdx_open: build_dir is NULL");
    gdx_options o;
    std::memset(&o, 0, sizeof o);
    if (options) o = *options;
    auto rt = std::make_unique<gdx_runtime>();
    rt->impl.open(build_dir, o);
    *out = rt.release();
  });
}

void gdx_close(gdx_runtime* rt) { delete rt; }

int gdx_image_size(const gdx_runtime* rt) {
  if (!rt) return -1;
  const auto& m = *rt->impl.manifest;
  return rt->impl.up ? m.upsampler.image_size : m.unet.image_size;
}
int gdx_base_image_size(const gdx_runtime* rt) { return rt ? rt->impl.manifest->unet.image_size : -1; }
int gdx_has_upsampler(const gdx_runtime* rt) { return rt && rt->impl.up ? 1 : 0; }
int gdx_has_classifier(const gdx_runtime* rt) { return rt && rt->impl.clf ? 1 : 0; }
int gdx_num_classes(const gdx_runtime* rt) { return rt ? rt->impl.num_classes() : -1; }
int gdx_batch_max(const gdx_runtime* rt) { return rt ? rt->impl.batch_max() : -1; }
double gdx_default_scale(const gdx_runtime* rt) { return rt ? rt->impl.default_scale() : 0.0; }

int gdx_num_steps(const gdx_runtime* rt, const char* steps) {
  int k = -1;
  gdx_status s = guarded([&] {
    if (!rt) gdx::fail(GDX_ERR_ARGUMENT, "gdx_num_steps: the runtime is NULL");
    k = rt->impl.base_schedule(rt->impl.steps_or_default(steps)).size();
  });
  return s == GDX_OK ? k : -1;
}

gdx_status gdx_sample_ex(gdx_runtime* rt, const gdx_sample_params* params, uint8_t* out_images,
                         int64_t* out_labels, float* out_base, float* out_trajectory) {
  return guarded([&] {
    if (!rt) gdx::fail(GDX_ERR_ARGUMENT, "gdx_sample: the runtime is NULL (did gdx_open fail?)");
    if (!params) gdx::fail(GDX_ERR_ARGUMENT, "gdx_sample_ex: params is NULL: start from gdx_default_params()");
    rt->impl.sample(*params, out_images, out_labels, out_base, out_trajectory);
  });
}

gdx_status gdx_sample(gdx_runtime* rt, const int64_t* labels, int n, double scale, const char* steps,
                      uint64_t seed, int64_t first_index, uint8_t* out_uint8_nhwc) {
  gdx_sample_params p = gdx_default_params();
  p.labels = labels;
  p.n = n;
  p.scale = scale;
  p.steps = steps;
  p.seed = seed;
  p.first_index = first_index;
  return gdx_sample_ex(rt, &p, out_uint8_nhwc, nullptr, nullptr, nullptr);
}

gdx_status gdx_standard_normal(uint64_t seed, int64_t index, int64_t stream, size_t count, float* out) {
  return guarded([&] {
    if (!out && count) gdx::fail(GDX_ERR_ARGUMENT, "gdx_standard_normal: out is NULL");
    gdx::Rng r({seed, static_cast<uint64_t>(index), static_cast<uint64_t>(stream)});
    r.normals(out, count);
  });
}

}  // extern "C"
