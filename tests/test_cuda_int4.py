"""Int4 weights on CUDA (offload/kernels/int4.py, offload/quantize.py): the kernel
against its reference (Triton's interpreter on the CPU), the linears' form there, `auto`
choosing it when the dense weights would not leave room on the device, and a model
loaded that way decoding as a dense model with the same (dequantized) weights."""

import json
import shutil

import pytest
import torch

from offload import Runtime, quantize, weight_forms
from offload.errors import ConfigError
from offload.kernels import int4 as K
from offload.loading import count_parameters, read_args
from offload.plan import make_plan
from tests.conftest import DEVICE, on_cuda

GiB = 1 << 30
CUDA = torch.device("cuda")


def _weight(g, n, k):
    nibbles = torch.randint(0, 256, (n, k // 32, 16), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02).half()
    lo = (torch.randn(n, k // 32, generator=g) * 0.1).half()
    return nibbles.to(DEVICE), scale.to(DEVICE), lo.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K_", [(1, 100, 64), (3, 77, 320), (8, 40, 1056)])
def test_int4_kernel_equals_its_reference(dtype, M, N, K_):
    """Outputs and groups that fill no whole block (N 77, 33 groups of 8), rows up
    to the kernel's limit. Float32 to its rounding; bfloat16 to one unit in the last place
    (the interpreter truncates where a GPU rounds)."""
    g = torch.Generator().manual_seed(M * N)
    x = torch.randn(M, K_, generator=g).to(DEVICE, dtype)
    w = _weight(g, N, K_)
    out = K.int4_matmul(x, *w)
    assert out.shape == (M, N) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)
    torch.testing.assert_close(out.float(), K.int4_matmul_ref(x, *w).float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K_", [(100, 64), (77, 1056)])
def test_int4_dequantize_kernel_equals_its_reference(dtype, N, K_):
    """Rounded as the reference rounds (float32: equal); in bfloat16 to one unit in the
    last place (the interpreter truncates)."""
    g = torch.Generator().manual_seed(N)
    w = _weight(g, N, K_)
    out = K.dequantize(*w, dtype)
    want = K.dequantize_ref(*w).to(dtype)
    if dtype == torch.float32:
        assert torch.equal(out, want)
    torch.testing.assert_close(out, want, rtol=2**-7, atol=0)


def test_a_layer_dequantized_once_serves_every_chunk(monkeypatch):
    """Within `dequantized_once` a prefill chunk multiplies the weight made on entry:
    no dequantization per chunk, the same outputs; after it, none is held."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32))
    for i, lin in enumerate(list(layer)):
        layer[i] = quantize.Int4Linear(lin.to(DEVICE), device=DEVICE)
    x = torch.randn(60, 64).to(DEVICE)  # (past both kernels' rows)
    want = layer(x)
    made = []
    real = quantize.Int4Linear.dequantized
    monkeypatch.setattr(quantize.Int4Linear, "dequantized",
                        lambda self, dt: made.append(self.held is None) or real(self, dt))  # fmt: skip
    with quantize.dequantized_once(layer, torch.float32):
        assert made == [True, True]  # one each, on entry
        for _ in range(3):
            torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        assert made == [True, True] + [False] * 6
    assert all(m.held is None for m in layer)


def test_int4_linear_on_cuda_keeps_the_cpu_forms_codes_and_nothing_else():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    cpu = quantize.Int4Linear(linear)
    x = torch.randn(K.MAX_ROWS + 1, 64).to(torch.bfloat16)
    with on_cuda():
        gpu = quantize.Int4Linear(linear, device=CUDA)
        names = {n for n, _ in gpu.named_buffers()}
        assert names == {"nibbles", "group_scale", "group_min"}
        assert all(t.is_cuda for t in gpu.state_dict().values())
        # (the CPU form reads its codes from torch's packed copy: `codes`)
        held = {"nibbles": quantize.int4_nibbles(cpu.codes()), "group_scale": cpu.group_scale,
                "group_min": cpu.group_min}  # fmt: skip
        for name in names:
            assert torch.equal(getattr(gpu, name).cpu(), held[name])
        xc = x.to(CUDA)
        one = gpu(xc[:1]).cpu()  # the kernel
        many = gpu(xc).cpu()  # past its rows: the weight dequantized, one matmul
    w = cpu.dequantized(torch.float32)
    want = (x.float() @ w.t() + linear.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(one.float(), want[:1].float(), rtol=2**-7, atol=2**-6)
    # (the CPU's prefill path's weight, in the chunk's dtype)
    want = torch.nn.functional.linear(x, cpu.dequantized(torch.bfloat16), linear.bias)
    torch.testing.assert_close(many.float(), want.float(), rtol=2**-7, atol=2**-6)


def test_auto_weights_on_cuda_follow_the_free_memory(monkeypatch):
    """Dense while the dense weights leave `DENSE_ROOM` free, else int4; `int8` is the
    CPU's only; on the CPU `auto` still follows the file."""
    monkeypatch.setattr(weight_forms, "device_free_bytes", lambda device: 24 * GiB)
    resolve = weight_forms.resolve_weights
    assert resolve("auto", None, CUDA, 16 * GiB) == "dense"  # an 8B model on a 24 GB card
    assert resolve("auto", "Q4_1", CUDA, 21 * GiB) == "dense"
    assert resolve("auto", None, CUDA, 22 * GiB) == "int4"  # (12B: 24 GiB)
    assert resolve("int4", None, CUDA, GiB) == "int4"
    assert resolve("dense", None, CUDA, 30 * GiB) == "dense"  # (refused later, when it fails)
    with pytest.raises(ConfigError, match="model.weights: 'int8'.*on cuda use dense, int4"):
        resolve("int8", None, CUDA)
    assert resolve("auto", "Q4_1", torch.device("cpu")) == "int4"
    assert resolve("auto", None, torch.device("cpu")) == "dense"


def test_the_plan_counts_int4_weights_as_a_gpu_runs_them():
    """`offload plan` with `auto`: a 14B model's weights at int4 on a 24 GB card (its
    dense bf16 weights would be 27.5 GiB), an 8B model's dense; the plan's weights row
    is what the runtime holds."""
    from offload.model_args import ModelArgs

    qwen14 = ModelArgs(arch="qwen2", head_dim=128, dim=5120, num_layers=48, num_heads=40, num_kv_heads=8, hidden_dim=13824,
                       vocab_size=152064, max_seq_len=131072)  # fmt: skip
    llama8 = ModelArgs(arch="llama", head_dim=128, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, hidden_dim=14336,
                       vocab_size=128256, max_seq_len=131072)  # fmt: skip
    card = 24 * GiB - GiB // 2

    def weights_row(a, weights):
        p = make_plan(a, 32768, card, 64 * GiB, weights=weights)
        assert p.weights == ("dense" if a is llama8 and weights == "auto" else "int4")
        return next(r.nbytes for r in p.rows if r.what == "weights")

    dense14 = count_parameters(qwen14) * 2
    assert dense14 > card
    int4 = weights_row(qwen14, "auto")
    assert int4 == weight_forms.weight_bytes(qwen14, 2, "int4") == weights_row(qwen14, "int4")
    assert 10 * GiB < int4 < 12 * GiB  # 13.2B linear weights at 0.625 bytes, 1.6B dense
    assert weights_row(llama8, "auto") == count_parameters(llama8) * 2
    with pytest.raises(ConfigError, match="int8"):
        make_plan(qwen14, 32768, card, 64 * GiB, weights="int8")
    # a layer-by-layer prefill holds the running layer's linears dequantized
    p = make_plan(qwen14, 32768, card, 64 * GiB)
    peak = p.prefill_peak_bytes
    p.weights = "dense"
    assert peak - p.prefill_peak_bytes == weight_forms.linear_parameters(qwen14) // 48 * 2


def _dequantized(model) -> dict[str, torch.Tensor]:
    """Each int4 linear's weight, dequantized to float32, on the CPU, by module name."""
    return {
        name: m.dequantized(torch.float32).cpu()
        for name, m in model.named_modules()
        if isinstance(m, quantize.Int4Linear)
    }


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias", "phi4-partial-rope"])
def test_a_model_too_big_for_the_gpu_decodes_at_int4_as_its_dequantized_twin(
    tiny_dirs, monkeypatch, name
):
    """`auto` with too little free memory: each block linear is quantized on the device
    as it is read (the dense model is never whole anywhere), and a decode (its steps
    captured and replayed on CUDA) gives the tokens of the dense CPU model whose weights
    are the dequantized codes. Biases (qwen2), phi3's fused q/k/v and gate/up (split by
    rows) and Phi-4-mini's reordered q/k rows (partial RoPE) carry over to the codes."""
    path = tiny_dirs[name][0]
    a = read_args(path)[1]
    free = count_parameters(a) * 4 + weight_forms.DENSE_ROOM - 1  # float32: one byte short
    monkeypatch.setattr(weight_forms, "device_free_bytes", lambda device: free)
    prompt = "the river stone light window garden seven"
    packed = []  # the linears packed as they were read
    install = quantize.Int4Packer.install
    monkeypatch.setattr(quantize.Int4Packer, "install",
                        lambda self, model, rows: packed.extend(rows) or install(self, model, rows))  # fmt: skip
    rows = []  # the rows of x each kernel call took (decode steps: 1)
    kernel = K.int4_matmul
    monkeypatch.setattr(K, "int4_matmul", lambda x, *w: rows.append(x.shape[0]) or kernel(x, *w))
    with on_cuda():
        with pytest.warns(UserWarning, match=r"model.weights = 'auto'.*run at int4"):
            rt = Runtime.from_pretrained(path, dtype="float32", device="cuda")
        model = rt.loaded.model
        assert model.weights == "int4" and rt.loaded.fingerprint.endswith("+int4")
        linears = [m for m in model.modules() if isinstance(m, quantize.Int4Linear)]
        assert len(linears) == 4 * a.num_layers  # wqkv, wo, w13, w2
        assert len(packed) == 7 * a.num_layers  # wq, wk, wv, wo, w1, w3, w2
        assert type(model.output) is torch.nn.Linear  # the head stays dense
        assert all(t.is_cuda for t in model.state_dict().values())
        got = [s.token_id for s in rt.stream(prompt, 12, temperature=0.0)]
        weights = _dequantized(model)
    assert rows and set(rows) == {1}  # (the prompt's prefill: dequantized weights)
    twin = Runtime.from_pretrained(path, dtype="float32", device="cpu", weights="dense")
    for name, w in weights.items():
        twin.loaded.model.get_submodule(name).weight.data = w
    want = [s.token_id for s in twin.stream(prompt, 12, temperature=0.0)]
    assert got == want


@pytest.mark.parametrize("quant", [None, "Q4_1"])
def test_a_gguf_quantized_on_cuda_is_cached_in_that_form(tmp_path, monkeypatch, quant):
    """The converted model's cache holds the int4 form `auto` chose; the next start
    loads it (and says why again); with room for the dense weights, `auto` no longer
    takes the cached int4 form but converts to dense. A Q4_1 file's linears keep their
    codes on the device (the dequantized weights are the file's)."""
    from safetensors import safe_open

    from offload.loading import load
    from tests.gguf_files import write_gguf

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf", dim=64, ff=96, quant=quant)
    folder = tmp_path / "cache" / "weights"
    free = [GiB]
    monkeypatch.setattr(weight_forms, "device_free_bytes", lambda device: free[0])
    with on_cuda():
        with pytest.warns(UserWarning, match="run at int4"):
            first = load(src, torch.float32, CUDA, "auto")
        (cached,) = folder.glob("*.safetensors")
        with pytest.warns(UserWarning, match="run at int4"):
            again = load(src, torch.float32, CUDA, "auto")
        assert again.model.weights == "int4" and list(folder.glob("*.safetensors")) == [cached]
        assert isinstance(again.model.layers[0].feed_forward.w2, quantize.Int4Linear)
        made, read = first.model.state_dict(), again.model.state_dict()
        assert made.keys() == read.keys()
        assert all(torch.equal(made[k].cpu(), read[k].cpu()) for k in made)
        free[0] = 80 * GiB
        dense = load(src, torch.float32, CUDA, "auto")
        assert dense.model.weights == "dense"
        if quant:  # (the file's codes: dequantized, the dense load's weights)
            for name, w in _dequantized(again.model).items():
                assert torch.equal(w, dense.model.get_submodule(name).weight.cpu())
    assert list(folder.glob("*.safetensors")) == [cached]  # (the same slot, rewritten)
    with safe_open(str(cached), framework="pt") as f:
        assert json.loads(f.metadata()["offload"])["weights"] == "dense"


def test_offload_info_gives_both_forms_of_the_weights(tmp_path):
    """What a user deciding on a model sees: its weights in bf16, and at int4 as CUDA
    runs them where bf16 does not fit (metadata only)."""
    from offload.loading import read_model_info
    from tests.test_plan import QWEN25_14B

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_14B))
    info = read_model_info(tmp_path)
    a = read_args(tmp_path)[1]
    assert info["weights_bytes"] == count_parameters(a) * 2 > 27 * GiB
    assert info["int4_weights_bytes"] == weight_forms.weight_bytes(a, 2, "int4") < 11 * GiB


def test_an_hf_directory_quantized_on_cuda_is_cached(tiny_dirs, tmp_path, monkeypatch):
    """The next start of an HF directory at int4 reads the cache, not the dense shards;
    a dense start (on the CPU, or with room on the GPU) neither reads nor writes it, and
    a changed file in the directory misses it."""
    import offload.weights
    from offload.loading import load

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    shutil.copytree(tiny_dirs["qwen2-bias"][0], src)
    folder = tmp_path / "cache" / "weights"
    free = [GiB]
    monkeypatch.setattr(weight_forms, "device_free_bytes", lambda device: free[0])
    load(src, torch.float32, torch.device("cpu"), "auto")
    assert not folder.exists()  # (dense on the CPU: the shards are the cache)
    real = offload.weights.load_hf_model
    with on_cuda():
        with pytest.warns(UserWarning, match="run at int4"):
            first = load(src, torch.float32, CUDA, "auto")
        (cached,) = folder.glob("model-*.safetensors")
        monkeypatch.setattr(offload.weights, "load_hf_model", lambda *a: pytest.fail("read"))
        with pytest.warns(UserWarning, match="run at int4"):
            again = load(src, torch.float32, CUDA, "auto")
        assert again.fingerprint == first.fingerprint and again.model.weights == "int4"
        made, read = first.model.state_dict(), again.model.state_dict()
        assert made.keys() == read.keys()
        assert all(torch.equal(made[k].cpu(), read[k].cpu()) for k in made)
        free[0] = 80 * GiB
        with pytest.raises(pytest.fail.Exception, match="read"):
            load(src, torch.float32, CUDA, "auto")  # dense now: the shards are read
        monkeypatch.setattr(offload.weights, "load_hf_model", real)
        free[0] = GiB
        (src / "generation_config.json").write_text("{}")  # a changed directory
        with pytest.warns(UserWarning, match="run at int4"):
            load(src, torch.float32, CUDA, "auto")
    assert len(list(folder.glob("*.safetensors"))) == 1 and not cached.exists()
