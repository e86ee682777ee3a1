#include "quant_checks.h"

#include "error_text.h"

namespace moequant {

QuantType parse_quant_type(c10::string_view name) {
  if (name == "nf4") return QuantType::kNF4;
  if (name == "fp4") return QuantType::kFP4;
  if (name == "int8") return QuantType::kInt8;
  TORCH_CHECK(false, "moequant: quant_type must be one of \"nf4\", \"fp4\", \"int8\", got \"", std::string(name),
              "\"");
}

const char* quant_type_name(QuantType t) {
  switch (t) {
    case QuantType::kNF4: return "nf4";
    case QuantType::kFP4: return "fp4";
    case QuantType::kInt8: return "int8";
  }
  return "?";
}

c10::SymInt StackShape::matrices() const {
  c10::SymInt n = 1;
  for (const auto& d : leading) n = n * d;
  return n;
}

c10::SymInt StackShape::blocks_per_matrix(int64_t blocksize) const {
  return is_4bit(type) ? matrix_numel() / blocksize : rows;
}

c10::SymInt StackShape::block_numel(int64_t blocksize) const {
  return is_4bit(type) ? c10::SymInt(blocksize) : cols;
}

c10::SymInt StackShape::groups_per_matrix(int64_t blocksize) const {
  return (blocks_per_matrix(blocksize) + (kDoubleQuantGroup - 1)) / kDoubleQuantGroup;
}

std::vector<c10::SymInt> StackShape::weight_sizes() const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(rows);
  s.push_back(cols);
  return s;
}

std::vector<c10::SymInt> StackShape::packed_sizes() const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(rows);
  s.push_back(is_4bit(type) ? cols / 2 : cols);
  return s;
}

std::vector<c10::SymInt> StackShape::absmax_sizes(int64_t blocksize) const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(blocks_per_matrix(blocksize));
  return s;
}

std::vector<c10::SymInt> StackShape::scale_sizes(int64_t blocksize) const {
  std::vector<c10::SymInt> s = leading;
  s.push_back(groups_per_matrix(blocksize));
  return s;
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "moequant: blocksize must be a power of two in [32, 4096], got ", num_str(blocksize));
}

static bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

static StackShape shape_of(c10::SymIntArrayRef sizes, bool packed, QuantType type) {
  StackShape shape;
  shape.type = type;
  shape.leading.assign(sizes.begin(), sizes.end() - 2);
  shape.rows = sizes[sizes.size() - 2];
  const c10::SymInt& last = sizes[sizes.size() - 1];
  shape.cols = packed && is_4bit(type) ? last * 2 : last;
  return shape;
}

StackShape check_quantize_args(const at::Tensor& weight, int64_t blocksize, QuantType type) {
  if (is_4bit(type)) check_blocksize(blocksize);  // int8 ignores blocksize
  TORCH_CHECK(is_float_dtype(weight.scalar_type()),
              "moequant.quantize_nf4: weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() >= 2, "moequant.quantize_nf4: weight must have at least 2 dims ([..., N, K]), got shape ",
              dims_str(weight.sym_sizes()));
  const StackShape shape = shape_of(weight.sym_sizes(), /*packed=*/false, type);
  if (is_4bit(type)) {
    TORCH_CHECK(shape.cols % 2 == 0,
                "moequant.quantize_nf4: the last dim K of weight must be even (two 4-bit codes per byte), got shape ",
                dims_str(weight.sym_sizes()));
    TORCH_CHECK(shape.matrix_numel() % blocksize == 0,
                "moequant.quantize_nf4: N*K of each matrix must be a multiple of blocksize=", num_str(blocksize),
                " (a block never straddles two experts), got shape ", dims_str(weight.sym_sizes()));
  }
  return shape;
}

void check_statistics(const char* op, const std::string& name, const StackShape& shape, int64_t blocksize,
                      const at::Tensor& absmax, const std::optional<at::Tensor>& absmax_scale,
                      const std::optional<at::Tensor>& absmax_offset, const at::Tensor& packed) {
  const std::string absmax_name = name + "absmax";
  const auto expected = shape.absmax_sizes(blocksize);
  const bool double_quant = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat || double_quant, op, ": ", absmax_name,
              " must be float32 (plain statistics) or uint8 (double-quantized) ",
              dims_str(c10::SymIntArrayRef(expected)), ", got ", absmax.scalar_type());
  TORCH_CHECK(absmax.sym_sizes() == c10::SymIntArrayRef(expected), op, ": ", absmax_name, " must have shape ",
              dims_str(c10::SymIntArrayRef(expected)), " for quant_type \"", quant_type_name(shape.type),
              "\" and packed shape ",
              dims_str(packed.sym_sizes()),
              is_4bit(shape.type) ? " and blocksize " + num_str(blocksize) : std::string(" (one per row)"), ", got ",
              dims_str(absmax.sym_sizes()));
  TORCH_CHECK(absmax.device() == packed.device(), op, ": ", name, "packed and ", absmax_name,
              " must be on the same device, got ", packed.device(), " and ", absmax.device());
  if (!double_quant) {
    TORCH_CHECK(!absmax_scale.has_value() && !absmax_offset.has_value(), op, ": ", name, "absmax_scale and ", name,
                "absmax_offset are only for double-quantized statistics (uint8 ", absmax_name, "); ", absmax_name,
                " is float32");
    return;
  }
  TORCH_CHECK(is_4bit(shape.type), op, ": int8 stacks have no double-quantized statistics: ", absmax_name,
              " must be float32 [..., N], got uint8");
  TORCH_CHECK(absmax_scale.has_value() && absmax_offset.has_value(), op, ": ", absmax_name,
              " is uint8 (double-quantized), so ", name, "absmax_scale and ", name, "absmax_offset must be given");
  const auto scale_sizes = shape.scale_sizes(blocksize);
  TORCH_CHECK(absmax_scale->scalar_type() == at::kFloat &&
                  absmax_scale->sym_sizes() == c10::SymIntArrayRef(scale_sizes),
              op, ": ", name, "absmax_scale must be float32 ", dims_str(c10::SymIntArrayRef(scale_sizes)),
              " (one per 256 blocks), got ", absmax_scale->scalar_type(), " ", dims_str(absmax_scale->sym_sizes()));
  const c10::SymIntArrayRef leading(shape.leading);
  TORCH_CHECK(absmax_offset->scalar_type() == at::kFloat && absmax_offset->sym_sizes() == leading, op, ": ", name,
              "absmax_offset must be float32 ", dims_str(leading), " (one per matrix), got ",
              absmax_offset->scalar_type(), " ", dims_str(absmax_offset->sym_sizes()));
  TORCH_CHECK(absmax_scale->device() == packed.device() && absmax_offset->device() == packed.device(), op, ": ",
              name, "absmax_scale and ", name, "absmax_offset must be on ", packed.device(), " like ", name,
              "packed, got ", absmax_scale->device(), " and ", absmax_offset->device());
}

StackShape check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert, QuantType type,
                              const std::optional<at::Tensor>& absmax_scale,
                              const std::optional<at::Tensor>& absmax_offset) {
  const char* op = "moequant.dequant_expert";
  if (is_4bit(type)) check_blocksize(blocksize);
  const bool four_bit = is_4bit(type);
  TORCH_CHECK(packed.scalar_type() == (four_bit ? at::kByte : at::kChar), op, ": packed must be ",
              four_bit ? "uint8 [..., N, K/2]" : "int8 [..., N, K]", " for quant_type \"", quant_type_name(type),
              "\", got ", packed.scalar_type());
  TORCH_CHECK(is_float_dtype(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(packed.dim() >= 2, op, ": packed must have at least 2 dims (", four_bit ? "[..., N, K/2]" : "[..., N, K]",
              "), got shape ", dims_str(packed.sym_sizes()));
  const StackShape shape = shape_of(packed.sym_sizes(), /*packed=*/true, type);
  if (four_bit) {
    TORCH_CHECK(shape.matrix_numel() % blocksize == 0, op, ": N*K of each matrix must be a multiple of blocksize=",
                num_str(blocksize), ", got packed shape ", dims_str(packed.sym_sizes()));
  }
  check_statistics(op, "", shape, blocksize, absmax, absmax_scale, absmax_offset, packed);
  if (expert.has_value()) {
    TORCH_CHECK(packed.dim() >= 3, op, ": expert= needs a stack [E, N, K], got packed of shape ",
                dims_str(packed.sym_sizes()));
    TORCH_CHECK(*expert >= 0 && packed.sym_size(0) > *expert, op, ": expert must be in [0, ",
                num_str(packed.sym_size(0)), "), got ", num_str(*expert));
  }
  return shape;
}

void check_compress_statistics_args(const at::Tensor& absmax) {
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() >= 1,
              "moequant.compress_statistics: absmax must be float32 [..., blocks] (plain statistics), got ",
              absmax.scalar_type(), " ", dims_str(absmax.sym_sizes()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_compressed_statistics(const at::Tensor& absmax) {
  std::vector<c10::SymInt> scale_sizes(absmax.sym_sizes().begin(), absmax.sym_sizes().end());
  scale_sizes.back() = (scale_sizes.back() + (kDoubleQuantGroup - 1)) / kDoubleQuantGroup;
  const c10::SymIntArrayRef leading = absmax.sym_sizes().slice(0, absmax.dim() - 1);
  return {at::empty_symint(absmax.sym_sizes(), absmax.options().dtype(at::kByte)),
          at::empty_symint(scale_sizes, absmax.options()), at::empty_symint(leading, absmax.options())};
}

std::vector<c10::SymInt> dequant_output_sizes(const StackShape& shape, std::optional<int64_t> expert) {
  std::vector<c10::SymInt> sizes = shape.weight_sizes();
  if (expert.has_value()) sizes.erase(sizes.begin());
  return sizes;
}

BlockScales block_scales_of(const StackShape& shape, int64_t blocksize, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_offset) {
  BlockScales s;
  s.blocks_per_matrix = shape.blocks_per_matrix(blocksize).expect_int();
  s.groups_per_matrix = shape.groups_per_matrix(blocksize).expect_int();
  if (absmax.scalar_type() == at::kByte) {
    s.code = absmax.const_data_ptr<uint8_t>();
    s.scale = absmax_scale->const_data_ptr<float>();
    s.offset = absmax_offset->const_data_ptr<float>();
  } else {
    s.absmax = absmax.const_data_ptr<float>();
  }
  return s;
}

}  // namespace moequant
