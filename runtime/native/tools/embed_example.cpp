// The README's embedding example: sample four guided digits from a build folder.
#include <cstdio>
#include <vector>

#include "gdexport.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s BUILD_DIR\n", argv[0]);
    return 2;
  }
  try {
    gdx::Runtime rt(argv[1]);  // checks the manifest and every sha256, compiles the engines
    std::vector<int64_t> labels = {1, 2, 3, 4};
    // The manifest's guidance scale and respacing; seed 0. Images are (4, S, S, 3) uint8.
    std::vector<uint8_t> images = rt.sample(labels, /*scale=*/-1, /*steps=*/"", /*seed=*/0);
    const int s = rt.image_size();
    std::printf("%zu images of %dx%d, first pixel %d\n", labels.size(), s, s, images[0]);
  } catch (const gdx::Error& e) {  // status() and the message of gdx_last_error()
    std::fprintf(stderr, "error %d: %s\n", e.status(), e.what());
    return 1;
  }
  return 0;
}
