// IDX files (gzip or plain): the first byte picks which of the pair the input is, the
// other is a valid 5-image file.
#include "fuzz.h"
#include "moecert/data.h"
#include "moecert/error.h"

MOECERT_FUZZ_TARGET(idx) {
  if (size < 1) return 0;
  const std::string dir = moecert_fuzz::scratch_dir();
  const uint8_t images[] = {0, 0, 8, 3, 0, 0, 0, 5,  0,  0,  0,  2,  0,  0,  0,  2,  1,  2,
                            3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
  const uint8_t labels[] = {0, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3, 4, 5};
  const bool as_images = data[0] & 1;
  moecert_fuzz::write_bytes(dir + "/img", as_images ? data + 1 : images,
                            as_images ? size - 1 : sizeof images);
  moecert_fuzz::write_bytes(dir + "/lbl", as_images ? labels : data + 1,
                            as_images ? sizeof labels : size - 1);
  try {
    moecert::data_load_idx(dir + "/img", dir + "/lbl", 10);
  } catch (const moecert::Error&) {
  }
  return 0;
}
