#include "nf4_checks.h"

#include "error_text.h"

namespace moequant {

c10::SymInt NF4StackShape::matrices() const {
  c10::SymInt n = 1;
  for (const auto& d : leading) n = n * d;
  return n;
}

std::vector<c10::SymInt> NF4StackShape::weight_sizes() const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(rows);
  s.push_back(cols);
  return s;
}

std::vector<c10::SymInt> NF4StackShape::packed_sizes() const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(rows);
  s.push_back(cols / 2);
  return s;
}

std::vector<c10::SymInt> NF4StackShape::absmax_sizes(int64_t blocksize) const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(matrix_numel() / blocksize);
  return s;
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "moequant: blocksize must be a power of two in [32, 4096], got ", num_str(blocksize));
}

static bool is_nf4_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

static NF4StackShape shape_of(c10::SymIntArrayRef sizes, bool packed) {
  NF4StackShape shape;
  shape.leading.assign(sizes.begin(), sizes.end() - 2);
  shape.rows = sizes[sizes.size() - 2];
  shape.cols = packed ? sizes[sizes.size() - 1] * 2 : sizes[sizes.size() - 1];
  return shape;
}

NF4StackShape check_quantize_args(const at::Tensor& weight, int64_t blocksize) {
  check_blocksize(blocksize);
  TORCH_CHECK(is_nf4_float_dtype(weight.scalar_type()),
              "moequant.quantize_nf4: weight must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() >= 2,
              "moequant.quantize_nf4: weight must have at least 2 dims ([..., N, K]), got shape ",
              dims_str(weight.sym_sizes()));
  const NF4StackShape shape = shape_of(weight.sym_sizes(), /*packed=*/false);
  TORCH_CHECK(shape.cols % 2 == 0,
              "moequant.quantize_nf4: the last dim K of weight must be even (two 4-bit codes per "
              "byte), got shape ",
              dims_str(weight.sym_sizes()));
  TORCH_CHECK(shape.matrix_numel() % blocksize == 0,
              "moequant.quantize_nf4: N*K of each matrix must be a multiple of blocksize=",
              num_str(blocksize), " (a block never straddles two experts), got shape ", dims_str(weight.sym_sizes()));
  return shape;
}

NF4StackShape check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, at::ScalarType dtype,
                                 std::optional<int64_t> expert) {
  check_blocksize(blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte,
              "moequant.dequant_expert: packed must be uint8 [..., N, K/2], got ",
              packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat,
              "moequant.dequant_expert: absmax must be float32 [..., N*K/blocksize], got ",
              absmax.scalar_type());
  TORCH_CHECK(is_nf4_float_dtype(dtype),
              "moequant.dequant_expert: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(packed.dim() >= 2,
              "moequant.dequant_expert: packed must have at least 2 dims ([..., N, K/2]), got "
              "shape ",
              dims_str(packed.sym_sizes()));
  TORCH_CHECK(packed.device() == absmax.device(),
              "moequant.dequant_expert: packed and absmax must be on the same device, got ",
              packed.device(), " and ", absmax.device());
  const NF4StackShape shape = shape_of(packed.sym_sizes(), /*packed=*/true);
  TORCH_CHECK(shape.matrix_numel() % blocksize == 0,
              "moequant.dequant_expert: N*K of each matrix must be a multiple of blocksize=",
              num_str(blocksize), ", got packed shape ", dims_str(packed.sym_sizes()));
  const auto expected = shape.absmax_sizes(blocksize);
  TORCH_CHECK(absmax.sym_sizes() == c10::SymIntArrayRef(expected),
              "moequant.dequant_expert: absmax must have shape ", dims_str(c10::SymIntArrayRef(expected)),
              " for packed of shape ", dims_str(packed.sym_sizes()), " and blocksize ", num_str(blocksize),
              ", got ", dims_str(absmax.sym_sizes()));
  if (expert.has_value()) {
    TORCH_CHECK(packed.dim() >= 3,
                "moequant.dequant_expert: expert= needs a stack [E, N, K/2], got packed of shape ",
                dims_str(packed.sym_sizes()));
    TORCH_CHECK(*expert >= 0 && packed.sym_size(0) > *expert,
                "moequant.dequant_expert: expert must be in [0, ", num_str(packed.sym_size(0)), "), got ",
                num_str(*expert));
  }
  return shape;
}

std::vector<c10::SymInt> dequant_output_sizes(const NF4StackShape& shape,
                                              std::optional<int64_t> expert) {
  std::vector<c10::SymInt> sizes = shape.weight_sizes();
  if (expert.has_value()) sizes.erase(sizes.begin());
  return sizes;
}

}  // namespace moequant
