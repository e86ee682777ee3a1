// moequant's operators called from C++ (LibTorch) through the dispatcher, including autograd.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "quant_format.h"

namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& w, int64_t blocksize,
                                            const std::string& quant_type = "nf4") {
  static auto h = op("moequant::quantize_nf4")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view)>();
  return h.call(w, blocksize, quant_type);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics(const at::Tensor& absmax) {
  static auto h = op("moequant::compress_statistics")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>();
  return h.call(absmax);
}

at::Tensor dequant(const at::Tensor& p, const at::Tensor& a, int64_t blocksize, at::ScalarType dtype,
                   std::optional<int64_t> expert, const std::string& quant_type = "nf4",
                   const std::optional<at::Tensor>& scale = std::nullopt,
                   const std::optional<at::Tensor>& offset = std::nullopt) {
  static auto h = op("moequant::dequant_expert")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::ScalarType,
                                        std::optional<int64_t>, c10::string_view, const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&)>();
  return h.call(p, a, blocksize, dtype, expert, quant_type, scale, offset);
}

c10::IValue opt(const std::optional<at::Tensor>& t) { return t ? c10::IValue(*t) : c10::IValue(); }

// Statistics of one stack: absmax, and the double-quant scale/offset when present.
struct Stats {
  at::Tensor absmax;
  std::optional<at::Tensor> scale, offset;
};

// experts_forward through the boxed dispatcher, with only the arguments a test varies.
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w, const at::Tensor& gu_p,
                           const Stats& gu, const at::Tensor& d_p, const Stats& d,
                           const std::optional<at::Tensor>& gu_A, const std::optional<at::Tensor>& gu_B,
                           const std::string& quant_type = "nf4") {
  static auto h = op("moequant::experts_forward");
  torch::jit::Stack stack{x, idx, w, gu_p, gu.absmax, d_p, d.absmax, int64_t{64}, std::string("silu"), false, false,
                          c10::IValue(), c10::IValue(), opt(gu_A), opt(gu_B), 1.0, c10::IValue(), c10::IValue(), 1.0,
                          1.702, 7.0, quant_type, opt(gu.scale), opt(gu.offset), opt(d.scale), opt(d.offset)};
  h.callBoxed(&stack);
  return stack[0].toTensor();
}

const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                        0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                        0.7229568362236023f, 1.0f};

TEST(NF4, QuantizeShapesAndRoundTrip) {
  torch::manual_seed(0);
  const at::Tensor w = torch::randn({3, 16, 128}, torch::kBFloat16);
  auto [packed, absmax] = quantize(w, 64);
  EXPECT_EQ(packed.sizes(), (std::vector<int64_t>{3, 16, 64}));
  EXPECT_EQ(packed.scalar_type(), at::kByte);
  EXPECT_EQ(absmax.sizes(), (std::vector<int64_t>{3, 32}));
  const at::Tensor d = dequant(packed, absmax, 64, at::kFloat, std::nullopt);
  const at::Tensor err = (d - w.to(at::kFloat)).abs().reshape({-1, 64}).amax(1);
  EXPECT_TRUE(err.le(absmax.reshape(-1) * 0.16f).all().item<bool>());
}

TEST(NF4, DequantFollowsTheCodebook) {
  const at::Tensor w = torch::randn({2, 8, 64});
  auto [packed, absmax] = quantize(w, 32);
  const at::Tensor d = dequant(packed, absmax, 32, at::kFloat, 1);
  const auto p = packed[1].reshape(-1).contiguous();
  const auto a = absmax[1].contiguous();
  for (int64_t i = 0; i < d.numel(); ++i) {
    const uint8_t byte = p.data_ptr<uint8_t>()[i / 2];
    const uint8_t code = i % 2 == 0 ? byte >> 4 : byte & 0xF;
    EXPECT_EQ(d.reshape(-1)[i].item<float>(), kNF4[code] * a.data_ptr<float>()[i / 32]);
  }
}

TEST(NF4, ZeroBlockIsCode7) {
  auto [packed, absmax] = quantize(torch::zeros({4, 64}), 64);
  EXPECT_TRUE(packed.eq(0x77).all().item<bool>());
  EXPECT_TRUE(absmax.eq(0).all().item<bool>());
}

TEST(NF4, ClearErrors) {
  EXPECT_THROW(quantize(torch::randn({4, 63}), 64), c10::Error);
  EXPECT_THROW(quantize(torch::randn({4, 64}), 48), c10::Error);
  auto [packed, absmax] = quantize(torch::randn({2, 4, 64}), 64);
  try {
    dequant(packed, absmax, 64, at::kFloat, 2);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expert must be in [0, 2)"), std::string::npos);
  }
}

TEST(Experts, ForwardBackwardThroughAutogradFromCpp) {
  torch::manual_seed(0);
  const int64_t T = 10, H = 64, I = 32, E = 4, k = 2, r = 4;
  auto [gu_p, gu_a] = quantize(torch::randn({E, 2 * I, H}) * 0.1, 64);
  auto [d_p, d_a] = quantize(torch::randn({E, H, I}) * 0.1, 64);
  const at::Tensor x = torch::randn({T, H}, torch::dtype(torch::kDouble).requires_grad(true));
  const at::Tensor idx = torch::randint(0, E, {T, k});
  const at::Tensor w = torch::rand({T, k}, torch::dtype(torch::kDouble).requires_grad(true));
  const at::Tensor A = (torch::randn({E, r, H}, torch::kDouble) * 0.1).requires_grad_(true);
  const at::Tensor B = (torch::randn({E, 2 * I, r}, torch::kDouble) * 0.1).requires_grad_(true);

  const at::Tensor out = experts_forward(x, idx, w, gu_p, {gu_a}, d_p, {d_a}, A, B);
  ASSERT_TRUE(out.requires_grad());
  const at::Tensor g = torch::randn_like(out);
  out.backward(g);

  // Finite-difference check of one coordinate of each gradient (the op is smooth in fp64).
  auto loss = [&](const at::Tensor& xx, const at::Tensor& ww, const at::Tensor& AA) {
    torch::NoGradGuard no_grad;
    return (experts_forward(xx, idx, ww, gu_p, {gu_a}, d_p, {d_a}, AA, B) * g).sum().item<double>();
  };
  const double eps = 1e-6;
  auto fd = [&](const at::Tensor& t, int64_t flat, auto make) {
    at::Tensor plus = t.detach().clone(), minus = t.detach().clone();
    plus.view(-1)[flat] += eps;
    minus.view(-1)[flat] -= eps;
    return (make(plus) - make(minus)) / (2 * eps);
  };
  const double dx = fd(x, 17, [&](const at::Tensor& v) { return loss(v, w.detach(), A.detach()); });
  const double dw = fd(w, 3, [&](const at::Tensor& v) { return loss(x.detach(), v, A.detach()); });
  const double dA = fd(A, 40, [&](const at::Tensor& v) { return loss(x.detach(), w.detach(), v); });
  EXPECT_NEAR(x.grad().view(-1)[17].item<double>(), dx, 1e-6);
  EXPECT_NEAR(w.grad().view(-1)[3].item<double>(), dw, 1e-6);
  EXPECT_NEAR(A.grad().view(-1)[40].item<double>(), dA, 1e-6);
  EXPECT_EQ(B.grad().sizes(), B.sizes());
}

TEST(Experts, NegativeIndexIsAClearError) {
  auto [gu_p, gu_a] = quantize(torch::randn({2, 64, 64}), 64);
  auto [d_p, d_a] = quantize(torch::randn({2, 64, 32}), 64);
  at::Tensor idx = torch::zeros({3, 1}, torch::kLong);
  idx[1][0] = -3;
  try {
    experts_forward(torch::randn({3, 64}), idx, torch::ones({3, 1}), gu_p, {gu_a}, d_p, {d_a}, std::nullopt,
                    std::nullopt);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("top_k_index must be >= 0"), std::string::npos);
  }
}

// ---- formats: one case per format through the dispatcher ----------------------------------

TEST(Formats, FP4FollowsItsCodebook) {
  torch::manual_seed(1);
  const at::Tensor w = torch::randn({2, 8, 64});
  auto [packed, absmax] = quantize(w, 32, "fp4");
  EXPECT_EQ(packed.sizes(), (std::vector<int64_t>{2, 8, 32}));
  const at::Tensor d = dequant(packed, absmax, 32, at::kFloat, 1, "fp4");
  const auto p = packed[1].reshape(-1).contiguous();
  const auto a = absmax[1].contiguous();
  for (int64_t i = 0; i < d.numel(); ++i) {
    const uint8_t byte = p.data_ptr<uint8_t>()[i / 2];
    const uint8_t code = i % 2 == 0 ? byte >> 4 : byte & 0xF;
    EXPECT_EQ(d.reshape(-1)[i].item<float>(), moequant::kFP4Values[code] * a.data_ptr<float>()[i / 32]);
  }
  // the largest magnitude of each block encodes as +-1 (codes 3 / 11)
  const at::Tensor err = (dequant(packed, absmax, 32, at::kFloat, std::nullopt, "fp4") - w).abs();
  EXPECT_TRUE(err.reshape({-1, 32}).amax(1).le(absmax.reshape(-1) * 0.25f).all().item<bool>());
}

TEST(Formats, DoubleQuantDecodesThroughTheDynamicMap) {
  torch::manual_seed(2);
  const int64_t E = 3, H = 64, I = 32, T = 7;
  auto [gu_p, gu_a] = quantize(torch::randn({E, 2 * I, H}) * 0.1, 64);
  auto [d_p, d_a] = quantize(torch::randn({E, H, I}) * 0.1, 64);
  auto [codes, scale, offset] = compress_statistics(gu_a);
  EXPECT_EQ(codes.scalar_type(), at::kByte);
  EXPECT_EQ(scale.sizes(), (std::vector<int64_t>{E, 1}));
  EXPECT_EQ(offset.sizes(), (std::vector<int64_t>{E}));
  // decoded absmax: map[code] * scale + offset, per expert
  at::Tensor decoded = at::empty_like(gu_a);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = 0; b < gu_a.size(1); ++b) {
      const float v = moequant::kDynamicMap[codes[e][b].item<uint8_t>()] * scale[e][0].item<float>() +
                      offset[e].item<float>();
      decoded[e][b] = v;
    }
  }
  EXPECT_TRUE(at::equal(dequant(gu_p, codes, 64, at::kFloat, std::nullopt, "nf4", scale, offset),
                        dequant(gu_p, decoded, 64, at::kFloat, std::nullopt)));
  EXPECT_TRUE((decoded - gu_a).abs().le(gu_a.abs().amax() * 0.02).all().item<bool>());
  const at::Tensor x = torch::randn({T, H});
  const at::Tensor idx = torch::randint(0, E, {T, 2});
  const at::Tensor w = torch::rand({T, 2});
  const at::Tensor got = experts_forward(x, idx, w, gu_p, {codes, scale, offset}, d_p, {d_a}, std::nullopt,
                                         std::nullopt);
  const at::Tensor want = experts_forward(x, idx, w, gu_p, {decoded}, d_p, {d_a}, std::nullopt, std::nullopt);
  EXPECT_TRUE(at::allclose(got, want, 1e-6, 1e-6));
  // codes without their scale/offset: a clear error naming the missing arguments
  try {
    experts_forward(x, idx, w, gu_p, {codes}, d_p, {d_a}, std::nullopt, std::nullopt);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("gate_up_absmax_scale and gate_up_absmax_offset must be given"),
              std::string::npos);
  }
}

TEST(Formats, Int8RowWiseForwardBackward) {
  torch::manual_seed(3);
  const int64_t E = 2, H = 32, I = 16, T = 6;
  auto [gu_q, gu_s] = quantize(torch::randn({E, 2 * I, H}) * 0.1, 64, "int8");
  auto [d_q, d_s] = quantize(torch::randn({E, H, I}) * 0.1, 64, "int8");
  EXPECT_EQ(gu_q.scalar_type(), at::kChar);
  EXPECT_EQ(gu_s.sizes(), (std::vector<int64_t>{E, 2 * I}));
  EXPECT_TRUE(gu_q.abs().amax().le(127).item<bool>());
  const at::Tensor d = dequant(gu_q, gu_s, 64, at::kFloat, 1, "int8");
  const at::Tensor want = (gu_q[1].to(at::kFloat) * gu_s[1].unsqueeze(1)) * moequant::kInt8InvScale;
  EXPECT_TRUE(at::equal(d, want));
  const at::Tensor x = torch::randn({T, H}, torch::requires_grad());
  const at::Tensor idx = torch::randint(0, E, {T, 1});
  const at::Tensor out = experts_forward(x, idx, torch::ones({T, 1}), gu_q, {gu_s}, d_q, {d_s}, std::nullopt,
                                         std::nullopt, "int8");
  out.sum().backward();
  EXPECT_EQ(x.grad().sizes(), x.sizes());
  EXPECT_TRUE(x.grad().abs().sum().item<float>() > 0);
}

}  // namespace
