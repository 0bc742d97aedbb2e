"""Delta and LoRA weight sync without an engine: encodings round-trip bit for bit, the engine
side state (``EngineWeights``) ends up with exactly the learner's weights, the LoRA merge is
peft's, and LoRA checkpoints load in transformers and peft."""

from __future__ import annotations

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.weights import LoraCheckpoint, LoraView, WeightPublisher, setup_lora
from climbrl.weights.codecs import EngineWeights, _decode, encode_change, merge, module_key
from climbrl.wire import WeightManifest, WireError, tensor_buffer


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()])
    )


def _roundtrip(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    frames = encode_change("w", old, new)
    if not frames:
        return old, []
    parts = {n.partition("#")[2]: t for n, t in frames}
    return _decode("w", parts, old), [n for n, _ in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encodings_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 48, generator=g).to(dtype)
    assert _roundtrip(old, old.clone()) == (old, [])  # unchanged: nothing travels
    sparse = old.clone()
    sparse[3, 5] = 7.0
    sparse[60, 0] = -0.0 if old[60, 0] == 0 else 0.0
    dense = (old.float() * (1 + 1e-4 * torch.randn(old.shape, generator=g))).to(dtype)
    dense[0, 0] = float("nan")
    dense[0, 1] = -0.0  # bits differ from +0.0
    ints = torch.int32 if dtype == torch.float32 else torch.int16
    hi = 2**31 - 1 if dtype == torch.float32 else 2**15 - 1
    big = torch.randint(-hi, hi, (64, 48), generator=g, dtype=ints).view(dtype)  # noise
    for new, want in (
        (sparse, "#sparse_idx"),
        (dense, "#xor" if dtype == torch.float32 else None),
        (big, None),
    ):
        got, names = _roundtrip(old, new)
        assert _bits_equal(got, new)
        if want:
            assert any(want in n for n in names), names
    got, names = _roundtrip(old, big)
    assert names == ["w"]  # incompressible: raw


def test_xor_is_smaller_than_raw_for_a_small_step():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(512, 512, generator=g)
    new = old - 1e-5 * torch.sign(torch.randn(old.shape, generator=g))  # Adam-like step
    ((name, t),) = encode_change("w", old, new)
    assert name == "w#xor" and t.numel() < 0.8 * old.numel() * 4
    got, _ = _roundtrip(old, new)
    assert _bits_equal(got, new)


def test_corrupt_delta_is_rejected():
    old = torch.randn(32, 32)
    new = old + 1e-6 * torch.randn(32, 32)
    ((name, t),) = encode_change("w", old, new)
    bad = t.clone()
    bad[-4:] = 0
    with pytest.raises(WireError):
        _decode("w", {"xor": bad}, old)
    with pytest.raises(WireError):
        _decode("w", {"": torch.zeros(3)}, old)


def test_module_key_groups_what_vllm_packs():
    k = module_key
    assert k("model.layers.0.self_attn.q_proj.weight") == k(
        "model.layers.0.self_attn.v_proj.weight"
    )
    assert k("model.layers.0.mlp.gate_proj.weight") == k("model.layers.0.mlp.up_proj.weight")
    assert k("model.layers.0.mlp.down_proj.weight") != k("model.layers.0.mlp.up_proj.weight")
    assert k("model.layers.0.self_attn.o_proj.weight") != k(
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert k("model.layers.1.mlp.experts.3.down_proj.weight") == "model.layers.1.mlp.experts"
    assert k("model.layers.1.self_attn.q_proj.weight") != k(
        "model.layers.0.self_attn.q_proj.weight"
    )


# ----------------------------------------------------------------------- learner <-> engine


def _cfg(tiny_model, **learner):
    ov = [f'model.path="{tiny_model}"'] + [
        f"learner.{k}={v!r}".replace("'", '"') for k, v in learner.items()
    ]
    return load_config(None, ov)


def _model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)


def _deliver(msgs, sid):
    """What server ``sid`` receives: (manifest, frames) after a trip through the codec."""
    for sids, m, tensors in msgs:
        if sid in sids:
            from climbrl.wire import ROLLOUT_ACCEPTS, Codec

            frames = Codec.encode(m, tensors)
            frames = [bytes(f) if isinstance(f, memoryview) else f for f in frames]
            return Codec(ROLLOUT_ACCEPTS).decode(frames)
    raise AssertionError(f"no message for {sid}")


def _train_step(model, lr=1e-4, steps=1, params=None):
    """A real AdamW step on a real LM loss."""
    opt = torch.optim.AdamW(params or [p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(
        0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2)
    )
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_delta_sync_leaves_engine_bit_identical(tiny_model):
    model = _model(tiny_model)
    pub = WeightPublisher(model, "delta")
    eng = EngineWeights(version=0)
    for version in range(1, 4):
        msgs = pub.messages(version, ["r0"])
        assert [m.kind for _, m, _ in msgs] == (["full"] if version == 1 else ["delta"])
        m, frames = _deliver(msgs, "r0")
        upd = eng.prepare(m, frames)
        eng.commit(upd)
        want = model.state_dict()
        assert set(eng.base) == set(want)
        for n, t in want.items():
            assert _bits_equal(eng.base[n], t), n
        if version > 1:
            # a reload covers whole vLLM modules, and only the changed ones
            assert {module_key(n) for n in upd.load} == {
                module_key(n.partition("#")[0]) for n in (x.name for x in m.tensors)
            }
        _train_step(model)
    # a server that failed or rejoined is not sent a delta
    pub.forget("r0")
    assert [m.kind for _, m, _ in pub.messages(5, ["r0"])] == ["full"]


def test_delta_of_one_tensor_reloads_its_packed_module(tiny_model):
    model = _model(tiny_model)
    pub = WeightPublisher(model, "delta")
    eng = EngineWeights(version=0)
    eng.commit(eng.prepare(*_deliver(pub.messages(1, ["r0"]), "r0")))
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] += 1.0
    m, frames = _deliver(pub.messages(2, ["r0"]), "r0")
    assert [t.name for t in m.tensors] == [
        "model.layers.1.self_attn.k_proj.weight#sparse_idx",
        "model.layers.1.self_attn.k_proj.weight#sparse_val",
    ]
    assert sum(len(tensor_buffer(f)) if not isinstance(f, bytes) else len(f) for f in frames) == 8
    upd = eng.prepare(m, frames)
    assert sorted(upd.load) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "kqv"]
    assert set(upd.restore) == set(upd.load)
    assert not torch.equal(
        upd.restore["model.layers.1.self_attn.k_proj.weight"],
        upd.load["model.layers.1.self_attn.k_proj.weight"],
    )


def test_delta_on_the_wrong_version_is_refused(tiny_model):
    model = _model(tiny_model)
    pub = WeightPublisher(model, "delta")
    eng = EngineWeights(version=0)
    eng.commit(eng.prepare(*_deliver(pub.messages(1, ["r0"]), "r0")))
    _train_step(model)
    pub.messages(2, ["r0"])  # lost on the way: the engine stays at 1
    _train_step(model)
    m, frames = _deliver(pub.messages(3, ["r0"]), "r0")
    assert m.kind == "delta" and m.base_version == 2
    with pytest.raises(WireError, match="needs a full sync"):
        eng.prepare(m, frames)
    assert eng.version == 1


# ----------------------------------------------------------------------- LoRA


def _lora_model(tiny_model, **kw):
    cfg = _cfg(tiny_model, **{"weights.mode": "lora", "weights.lora.r": 4}, **kw)
    model = setup_lora(_model(tiny_model), cfg.learner)
    with torch.no_grad():  # B starts at zero; make the adapters do something
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_lora_merge_is_peft_merge(tiny_model):
    model = _lora_model(tiny_model)
    view = LoraView(model)
    assert view.scale == 16.0 / 4
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    merged = view.merged_state()
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            w = f"{name}.weight"
            peft_merged = mod.get_base_layer().weight + mod.get_delta_weight("default")
            assert _bits_equal(merged[w], peft_merged), w
    # the merged dense model computes what the adapter model computes
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    plain = _model(tiny_model)
    plain.load_state_dict(merged)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-5


def test_lora_sync_sends_only_adapters_and_engine_merges(tiny_model):
    model = _lora_model(tiny_model, **{"weights.lora.targets": ["q_proj", "v_proj"]})
    pub = WeightPublisher(model, "lora")
    eng = EngineWeights(version=0)
    full = pub.messages(1, ["r0"])
    eng.commit(eng.prepare(*_deliver(full, "r0")))
    _train_step(model, lr=1e-2)
    msgs = pub.messages(2, ["r0"])
    ((_, m, tensors),) = msgs
    assert m.kind == "delta" and m.adapters
    assert all("#lora_" in t.name for t in m.tensors)
    assert pub.last["delta"] < 0.05 * sum(
        t.numel() * 4 for t in LoraView(model).base_state().values()
    )
    upd = eng.prepare(*_deliver(msgs, "r0"))
    eng.commit(upd)
    merged = LoraView(model).merged_state()
    for n, t in merged.items():
        assert _bits_equal(eng.effective(n), t), n
    # only the targeted modules (and their packed siblings) reload
    assert {n.split(".")[-2] for n in upd.load} == {"q_proj", "k_proj", "v_proj"}


def test_lora_targets_that_match_nothing_fail_clearly(tiny_model):
    cfg = _cfg(tiny_model, **{"weights.mode": "lora", "weights.lora.targets": ["nope_proj"]})
    with pytest.raises(ValueError, match="lora.targets"):
        setup_lora(_model(tiny_model), cfg.learner)


def test_lora_checkpoint_loads_merged_and_as_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from climbrl.learner.weights import load_adapter

    model = _lora_model(tiny_model)
    LoraCheckpoint(model, str(tiny_model)).save_pretrained(str(tmp_path), safe_serialization=True)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
        assert (merged(input_ids=ids).logits - want).abs().max() < 1e-5
        peft_model = PeftModel.from_pretrained(_model(tiny_model), str(tmp_path / "adapter"))
        assert (peft_model(input_ids=ids).logits - want).abs().max() < 1e-5
    # resume: fresh base + adapter == the saved model, bit for bit
    cfg = _cfg(tiny_model, **{"weights.mode": "lora", "weights.lora.r": 4})
    again = setup_lora(_model(tiny_model), cfg.learner)
    load_adapter(again, tmp_path / "adapter")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert _bits_equal(a, b), n


def test_adapter_shape_mismatch_is_refused(tiny_model):
    model = _lora_model(tiny_model)
    pub = WeightPublisher(model, "lora")
    eng = EngineWeights(version=0)
    eng.commit(eng.prepare(*_deliver(pub.messages(1, ["r0"]), "r0")))
    w = "model.layers.0.self_attn.q_proj.weight"
    a = torch.zeros(4, 7)
    m = WeightManifest(
        version=2, kind="delta", base_version=1, adapters=True, lora_scale=4.0, tensors=[]
    )
    from climbrl.weights.codecs import metas

    frames = [(f"{w}#lora_A", a), (f"{w}#lora_B", torch.zeros(eng.base[w].shape[0], 4))]
    m.tensors = metas(frames)
    with pytest.raises(WireError, match="do not fit"):
        eng.prepare(m, [tensor_buffer(t) for _, t in frames])
    assert merge(torch.ones(2, 2), torch.ones(1, 2), torch.ones(2, 1), 0.5).eq(1.5).all()


def test_moe_state_is_published_under_checkpoint_names(tmp_path):
    """The engine loads the checkpoint's per-expert names, not transformers' fused ones."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.learner.weights import WeightPublisher
    from climbrl.tinymodel import make_tiny_model

    path = make_tiny_model(tmp_path / "moe", corpus_for_tokenizer(), moe=True, num_experts=4)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    [(servers, manifest, frames)] = WeightPublisher(model, "full", str(path)).messages(1, ["r0"])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    sent = {m.name: t for m, t in zip(manifest.tensors, frames)}
    assert set(sent) == set(on_disk)
    assert all(torch.equal(sent[k], on_disk[k]) for k in on_disk)


def test_lora_on_moe_adapts_linear_layers_and_publishes_checkpoint_names(tmp_path):
    """MoE experts fused into 3-D tensors are not Linear layers: LoRA leaves them on their base
    weights, and the LoRA full sync carries every checkpoint tensor under its on-disk name."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.tinymodel import make_tiny_model

    path = make_tiny_model(tmp_path / "moe", corpus_for_tokenizer(), moe=True, num_experts=4)
    cfg = load_config(
        None, [f'model.path="{path}"', 'learner.weights.mode="lora"', "learner.weights.lora.r=4"]
    )
    model = setup_lora(AutoModelForCausalLM.from_pretrained(str(path)), cfg.learner)
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted and not any(".experts" in n for n in adapted)
    assert any(n.endswith("self_attn.q_proj") for n in adapted)
    [(_, manifest, _)] = WeightPublisher(model, "lora", str(path)).messages(1, ["r0"])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert {m.name for m in manifest.tensors if "#lora_" not in m.name} == on_disk


def test_same_host_full_sync_goes_through_one_shm_file(tiny_model, tmp_path):
    """Local servers get a manifest naming one file (no frames) that decodes to the same
    weights as the frames remote servers get; old files are removed, a failing reader falls
    back to frames."""
    import socket
    from pathlib import Path

    from climbrl.weights.files import map_shm

    model = _model(tiny_model)
    pub = WeightPublisher(model, "full", shm_dir=str(tmp_path))
    pub.join("a", socket.gethostname())
    pub.join("b", socket.gethostname())
    pub.join("far", "another-host")
    msgs = pub.messages(1, ["a", "b", "far"])
    (loc, m_loc, fr_loc), (rem, m_rem, fr_rem) = msgs
    assert (
        loc == ["a", "b"] and rem == ["far"] and fr_loc == [] and len(fr_rem) == len(m_rem.tensors)
    )
    assert m_loc.shm_path and len(m_loc.shm_offsets) == len(m_loc.tensors)
    assert pub.last["full"] == sum(t.numel() * t.element_size() for t in fr_rem)
    a = EngineWeights(0).prepare(
        m_loc, [], map_shm(m_loc.shm_path, m_loc.tensors, m_loc.shm_offsets)
    )
    b = EngineWeights(0).prepare(m_rem, [tensor_buffer(t) for t in fr_rem])
    assert set(a.load) == set(b.load) and all(torch.equal(a.load[n], b.load[n]) for n in a.load)
    # the mapping is a snapshot: training on does not change what the server maps
    snap = {n: t.clone() for n, t in a.load.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(a.load[n], snap[n]) for n in snap)
    first = m_loc.shm_path
    # Nobody acked: no file a server may read is rewritten. The ring's 3 files (rewritten in
    # place once free) are taken by versions 1-3, then each sync gets a new file; the last two
    # of those are kept.
    paths = []
    for v in (2, 3, 4, 5, 6):
        pub.forget("a")
        paths.append(pub.messages(v, ["a"])[0][1].shm_path)
    assert len({first, *paths}) == 6 and [Path(p).exists() for p in paths] == [
        True,
        True,
        False,
        True,
        True,
    ]
    assert all(torch.equal(a.load[n], snap[n]) for n in snap)  # version 1's file untouched
    with pytest.raises(WireError, match="shm weights file not readable"):
        map_shm(paths[2], m_loc.tensors, m_loc.shm_offsets)
    gone = EngineWeights(0).prepare(m_loc, [], map_shm(paths[3], m_loc.tensors, m_loc.shm_offsets))
    # "a" acks version 6: the ring files of its versions 2 and 3 are free and rewritten in
    # place; "b" still runs version 1, so that file is not
    pub.acked("a", 6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    pub.forget("a")
    ((_, m7, _),) = pub.messages(7, ["a"])
    assert m7.shm_path == paths[0]
    got = EngineWeights(0).prepare(m7, [], map_shm(m7.shm_path, m7.tensors, m7.shm_offsets))
    sd = model.state_dict()
    assert all(torch.equal(got.load[n], sd[n]) for n in got.load)
    assert all(torch.equal(a.load[n], snap[n]) for n in snap)  # "b"'s file still untouched
    assert any(not torch.equal(gone.load[n], got.load[n]) for n in got.load)
    with pytest.raises(WireError, match="offsets"):
        map_shm(str(tmp_path / "x"), m_loc.tensors, [o + 1 for o in m_loc.shm_offsets])
    pub.forget("a", shm_unreadable=True)
    assert pub.messages(4, ["a"])[0][1].shm_path == ""
    pub.close()
    assert not list(tmp_path.glob("*.weights"))


def test_sparse_small_steps_deflate_below_raw_sparse():
    """A bf16 step that moves a few % of the elements by an ulp or two (what most RL steps do
    to bf16 weights): compressed gaps + xor values, bit-exact, smaller than index + value."""
    g = torch.Generator().manual_seed(2)
    old = torch.randn(256, 256, generator=g).to(torch.bfloat16)
    bits = old.view(torch.int16).clone().reshape(-1)
    moved = torch.randperm(bits.numel(), generator=g)[: bits.numel() // 40]
    bits[moved] += torch.randint(-2, 3, (moved.numel(),), generator=g, dtype=torch.int16)
    new = bits.view(torch.bfloat16).view(old.shape)
    got, names = _roundtrip(old, new)
    assert _bits_equal(got, new) and names == ["w#gaps_z", "w#xorvals_z"]
    frames = encode_change("w", old, new)
    nnz = int((old.view(torch.int16) != new.view(torch.int16)).sum())
    assert sum(t.numel() for _, t in frames) < 0.6 * nnz * (4 + 2)
    bad = dict((n.partition("#")[2], t) for n, t in frames)
    bad["gaps_z"] = bad["gaps_z"][:-3]
    with pytest.raises(WireError):
        _decode("w", bad, old)


def test_orphaned_weights_files_are_removed(tmp_path):
    """Files of processes killed with -9 (learner or rollout server) are deleted; live ones stay."""
    import os
    import subprocess

    from climbrl.weights.files import remove_orphan_files

    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = [
        tmp_path / f"climbrl-{dead.pid}-r0.weights",
        tmp_path / f"climbrl-learner-{dead.pid}-3.weights",
        tmp_path / f"climbrl-{dead.pid}-r0.rollback",
    ]
    live = [
        tmp_path / f"climbrl-{os.getppid()}-r1.weights",
        tmp_path / "climbrl-learner-x.weights",
        tmp_path / "other.weights",
    ]
    for f in gone + live:
        f.write_bytes(b"w")
    removed = remove_orphan_files(tmp_path)
    assert sorted(removed) == sorted(gone)
    assert all(f.exists() for f in live)
