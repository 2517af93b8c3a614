/* gdexport native runtime: the C ABI.
 *
 * A build folder (its manifest.json and engine files) in, uint8 images out, with the numbers of
 * the Python runtime (`runtime/`): the same schedule, guided DDIM / DDPM loop, upsampler cascade
 * and per-sample noise (numpy's default_rng((seed, index, stream)), reproduced bit for bit).
 *
 * Every function returns a gdx_status; on failure gdx_last_error() says what was wrong and how
 * to fix it (a thread-local string, valid until the next call on this thread). Output buffers
 * are the caller's. A handle may be used by one thread at a time.
 */
#ifndef GDEXPORT_H_
#define GDEXPORT_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define GDX_API __declspec(dllexport)
#else
#define GDX_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gdx_status {
  GDX_OK = 0,
  GDX_ERR_ARGUMENT = 1,  /* a bad argument (label out of range, bad steps, batch...) */
  GDX_ERR_MANIFEST = 2,  /* the build folder or its manifest cannot be used */
  GDX_ERR_ENGINE = 3,    /* an engine cannot be created or run */
  GDX_ERR_NONFINITE = 4, /* NaN / inf in a model output, gradient or sample */
  GDX_ERR_INTERNAL = 5
} gdx_status;

typedef struct gdx_runtime gdx_runtime;

/* Options of gdx_open; zero-initialise (or pass NULL) for the defaults. */
typedef struct gdx_options {
  const char* engine;      /* "openvino" (default; reads the build's ONNX files) or "tensorrt" */
  const char* unet_file;   /* an artefact of the build to use as the UNet (default: the build's) */
  const char* precision;   /* "fp32", "fp16", ... (default: the first UNet artefact's) */
  const char* device;      /* OpenVINO device (default "CPU") */
  int threads;             /* OpenVINO inference threads (0: OpenVINO's default) */
  int no_classifier;       /* 1: leave the classifier gradient out (unguided only) */
  int no_upsampler;        /* 1: stop after the base stage */
} gdx_options;

/* Arguments of gdx_sample_ex; start from gdx_default_params(). */
typedef struct gdx_sample_params {
  const int64_t* labels;   /* n class ids, or NULL: drawn per sample (seed, index) */
  int n;                   /* number of samples */
  double scale;            /* guidance scale >= 0; negative: the manifest's default */
  const char* steps;       /* respacing ("ddim25", "25", "10,5,3"); NULL: the manifest's */
  const char* sampler;     /* "ddim" (default) or "ddpm" */
  double eta;              /* DDIM eta in [0, 1] */
  uint64_t seed;
  int64_t first_index;     /* the global index of the first sample (sharding) */
  int batch;               /* samples per engine call; 0: as many as fit */
  int upsampler_start_t;   /* -1: the manifest's; 0: the whole chain from noise */
  int upsample;            /* 0: stop after the base stage even if the build has an upsampler */
} gdx_sample_params;

GDX_API gdx_sample_params gdx_default_params(void);

GDX_API gdx_status gdx_open(const char* build_dir, const gdx_options* options, gdx_runtime** out);
GDX_API void gdx_close(gdx_runtime* rt);
GDX_API const char* gdx_last_error(void);
GDX_API const char* gdx_version(void);

/* Sizes: the final image side (the upsampler's where there is one), the base image side. */
GDX_API int gdx_image_size(const gdx_runtime* rt);
GDX_API int gdx_base_image_size(const gdx_runtime* rt);
GDX_API int gdx_has_upsampler(const gdx_runtime* rt);
GDX_API int gdx_has_classifier(const gdx_runtime* rt);
GDX_API int gdx_num_classes(const gdx_runtime* rt); /* -1: no classes */
GDX_API int gdx_batch_max(const gdx_runtime* rt);
GDX_API double gdx_default_scale(const gdx_runtime* rt);
/* Respaced steps of the base stage for `steps` (NULL: the manifest's), or -1 (see last error). */
GDX_API int gdx_num_steps(const gdx_runtime* rt, const char* steps);

/* n guided samples, DDIM eta 0: out_uint8_nhwc holds n * S * S * 3 bytes, S = gdx_image_size.
 * labels may be NULL (drawn per sample); scale < 0 takes the manifest's default. */
GDX_API gdx_status gdx_sample(gdx_runtime* rt, const int64_t* labels, int n, double scale,
                              const char* steps, uint64_t seed, int64_t first_index,
                              uint8_t* out_uint8_nhwc);

/* The full form. out_images: n * S * S * 3 uint8 (NHWC) of the final stage (the upsampler's
 * where params->upsample and the build has one). Optional (NULL to skip): out_labels (n int64),
 * out_base (n * 3 * s * s float32 NCHW, the base stage's samples in [-1, 1], s the base size),
 * out_trajectory (K * n * 3 * s * s float32: x_t at each base step, K = gdx_num_steps). */
GDX_API gdx_status gdx_sample_ex(gdx_runtime* rt, const gdx_sample_params* params,
                                 uint8_t* out_images, int64_t* out_labels, float* out_base,
                                 float* out_trajectory);

/* Numpy's default_rng([seed, index, stream]).standard_normal(count, dtype=float32), for tests
 * and for callers who feed their own noise elsewhere. */
GDX_API gdx_status gdx_standard_normal(uint64_t seed, int64_t index, int64_t stream, size_t count,
                                       float* out);

#ifdef __cplusplus
}
#endif
#endif /* GDEXPORT_H_ */
