import torch, sys
sys.path.insert(0, ".")
from kernels import reference
from kernels.triton.quant_gemm import candidates, quant_gemm, QuantConfig
from tests.kernels.test_quant_gemm import _quantized
for (m, n, k, bits, g, asym) in [(1, 45, 2048, 4, 32, True), (5, 33, 768, 4, 48, True), (5, 33, 768, 4, 48, False), (16, 64, 2048, 4, 128, True), (1, 64, 2048, 8, 64, False)]:
    gen = torch.Generator().manual_seed(1)
    _, packed, scales, zeros = _quantized(n, k, bits, g, asym, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    exact = reference.quant_linear(x.float(), packed, scales, bits, zeros)
    for c in candidates(m) + (QuantConfig(16, 32, 256, 4, 4, True), QuantConfig(1, 16, 512, 4, 3, False)):
        if not c.dot and m != 1: continue
        out = quant_gemm(x.cuda(), packed.cuda(), scales.cuda(), bits, zeros.cuda() if zeros is not None else None, None, c).float().cpu()
        print(m, n, k, bits, g, asym, c, f"{((out-exact).norm()/exact.norm()).item():.2e}")
