import torch, time
import pytest
from offload import Runtime
from tests.conftest import on_cuda, filler_text

def run_ops(rt_factory, tmp, tag):
    out = []
    rt = rt_factory()
    conv = rt.chat(system="Be brief.")
    for i, msg in enumerate([filler_text(6, seed=5), filler_text(8, seed=6), filler_text(10, seed=7)]):
        out.append(("chat", i, conv.send(msg, max_new_tokens=8)))
    conv.save(tmp / f"chat{tag}")
    rt2 = Runtime.load_session(tmp / f"chat{tag}", model=rt, config=rt.config)
    c2 = rt2.resume_chat()
    out.append(("resumed", c2.send(filler_text(5, seed=9), max_new_tokens=8)))
    rt3 = rt_factory()
    rt3.load_document(filler_text(40, seed=11))
    for q in ("seven stones?", "green river?", "north market?"):
        out.append(("ask", q, rt3.ask(q, max_new_tokens=8)))
    rt3.save_session(tmp / f"doc{tag}")
    rt4 = Runtime.load_session(tmp / f"doc{tag}", model=rt, config=rt.config)
    out.append(("loaded ask", rt4.ask("paper window?", max_new_tokens=8)))
    c4 = rt4.chat_about_document()
    out.append(("doc chat", c4.send("winter signal?", max_new_tokens=8)))
    out.append(("doc chat2", c4.send(filler_text(5, seed=3), max_new_tokens=8)))
    out.append(("gen", rt_factory().generate(filler_text(20, seed=2), max_new_tokens=60)))
    return out

CASES = {
    "chunk": dict(mode="sparse", selector="chunk", prefetch="off"),
    "exact": dict(mode="sparse", selector="exact", prefetch="auto"),
    "summary": dict(mode="sparse", selector="summary", prefetch="auto"),
    "spill": dict(mode="sparse", prefetch="auto", chunk_size=4, host_bytes="small"),
    "dense": dict(mode="dense", prefetch="off"),
    "nographs": dict(mode="sparse", prefetch="auto", cuda_graphs=False),
}

@pytest.mark.parametrize("case", list(CASES))
def test_scenario(tiny_dirs, tmp_path, case):
    path = tiny_dirs["llama-gqa-untied"][0]
    cpu = Runtime.from_pretrained(path, dtype="float32", mode="full")
    want = run_ops(lambda: Runtime(cpu.loaded, cpu.config, cpu.device), tmp_path, "c")
    kw = dict(CASES[case])
    t = time.time()
    with on_cuda():
        probe = Runtime.from_pretrained(path, dtype="float32", device="cuda",
            sink=4, window=16, dense_layers=1, retrieved=100_000, sparse_threshold=32, candidate_factor=2,
            **{k: v for k, v in kw.items() if k != "host_bytes"})
        cfg = probe.config.replace(device_bytes=400 * (probe.layout.token_bytes + probe.layout.token_bytes_per_layer))
        if kw.get("host_bytes"):
            cfg = cfg.replace(host_bytes=4 * probe.args.num_layers * probe.layout.chunk_bytes)
        got = run_ops(lambda: Runtime(probe.loaded, cfg, probe.device), tmp_path, "g")
    print(case, "emulated s", time.time() - t)
    for w, g in zip(want, got):
        if w != g: print("DIFF", w, g)
    assert got == want
