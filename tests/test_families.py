"""Qwen2, Qwen3 and Mistral parents against transformers' own modeling classes.

Each checkpoint is a random tiny model saved by transformers itself (Qwen2: q/k/v biases; Qwen3: per-head q/k
RMSNorm and a head_dim that is not hidden / heads; Mistral: one sliding window on every layer; the Qwen ones
with windows on some layers through `layer_types`), with random norms and biases so that every weight's
mapping matters. Windows (16 keys) are shorter than the sequences, so the window masks are exercised.
Tolerance: float32 relative error <= 1e-5, as for Llama (tests/test_model.py): the same math in fp32 with
different GEMM groupings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, ConfigError, FFNConfig
from tessera.runtime.cache import kept_tokens
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.runtime.sampling import SamplingParams

from .conftest import PAGE_SIZES, relative_error, save_hf, tokens_per_page

FP32_TOL = 1e-5
VOCAB = 97
WINDOW = 16


def hf_family(path: Path, family: str, tie: bool, seed: int = 0, **overrides) -> Path:
    """A random tiny checkpoint of `family` saved by transformers (GQA 8/2, 4 layers)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "qwen2":
        config = transformers.Qwen2Config(
            **kwargs,
            use_sliding_window=True,
            sliding_window=WINDOW,
            layer_types=["full_attention", "sliding_attention"] * 2,
        )
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        # head_dim 16 with hidden 64 and 8 heads: q is 128 wide, wider than the hidden size.
        config = transformers.Qwen3Config(
            **kwargs,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.MistralConfig(**kwargs, sliding_window=WINDOW)
        cls = transformers.MistralForCausalLM
    for key, value in overrides.items():
        setattr(config, key, value)
    return save_hf(cls(config), path)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


FAMILIES = ["qwen2", "qwen3", "mistral"]


@pytest.fixture(
    scope="module",
    params=[(f, tie) for f in FAMILIES for tie in (False, True)],
    ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}",
)
def family_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    family, tie = request.param
    return family, hf_family(tmp_path_factory.mktemp(family) / "model", family, tie)


def test_config_reads_what_transformers_builds(family_checkpoint, capsys) -> None:
    """Family, biases, q/k norms, head_dim, windows per layer and the exact parameter count (`tessera info`)."""
    import json

    from tessera.cli import main

    family, path = family_checkpoint
    arch = ArchConfig.from_json(path)
    reference = hf_model(path)
    assert arch.family == family
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_norm == (family == "qwen3")
    assert arch.head_dim == (16 if family == "qwen3" else 8)
    windows = [b.attention.window for b in arch.blocks]
    assert (
        windows
        == {
            "qwen2": [None, WINDOW, None, WINDOW],
            "qwen3": [WINDOW, None, WINDOW, None],
            "mistral": [WINDOW] * 4,
        }[family]
    )
    assert arch.num_params() == sum(p.numel() for p in reference.parameters())
    assert main(["info", "--model", str(path), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["num_params"] == arch.num_params()
    assert [layer["window"] for layer in info["layers"]] == windows


def test_prefill_logits_match_transformers(family_checkpoint) -> None:
    _, path = family_checkpoint
    reference, model = hf_model(path), load_model(path)
    assert (model.lm_head is None) == reference.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(0))  # 60 > the window of 16
    with torch.no_grad():
        expected = reference(ids).logits
        actual = model(ids)
    assert relative_error(actual, expected) <= FP32_TOL


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_engine_matches_transformers(family_checkpoint, monkeypatch, page_size) -> None:
    """Chunked prefill beside decodes in the serving engine: every logits row it samples from equals
    transformers' logits at that position (fp32, 1e-5), and greedy tokens equal transformers' generate, with
    prompts and generations longer than the window."""
    _, path = family_checkpoint
    reference, model = hf_model(path), load_model(path)
    engine = Engine(
        model, config=EngineConfig(max_batch=3, max_step_tokens=7, page_size=tokens_per_page(page_size, model))
    )
    recorded: list[torch.Tensor] = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: recorded.append(out := logits(h)) or out)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (25, 3, 18)]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    rows = torch.cat(recorded)
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            expected = reference.generate(
                torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            assert c.tokens == expected
            full = reference(torch.tensor([p + c.tokens])).logits[0]
            for i, token in enumerate(c.tokens):
                errors = [relative_error(r, full[len(p) - 1 + i]) for r in rows if r.argmax().item() == token]
                assert min(errors) <= FP32_TOL


def _config(family: str, tmp_path: Path, **changes) -> Path:
    import json

    path = hf_family(tmp_path / "model", family, tie=False)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("family", "changes", "field"),
    [
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("qwen2", {"mlp_bias": True}, "mlp_bias"),
        ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
        (
            "qwen3",
            {"layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]},
            "layer_types[1]",
        ),
        ("qwen2", {"layer_types": ["full_attention"]}, "layer_types"),
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ("mistral", {"sliding_window": 0}, "sliding_window"),
        ("qwen3", {"use_sliding_window": "yes"}, "use_sliding_window"),
        ("qwen2", {"model_type": "qwen2_moe"}, "model_type"),
    ],
)
def test_unsupported_fields_are_refused_by_name(family, changes, field, tmp_path) -> None:
    path = _config(family, tmp_path, **changes)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as e:
        ArchConfig.from_json(path)
    assert str(path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_defaults_follow_transformers(tmp_path) -> None:
    """Keys transformers fills in when a config.json leaves them out: Mistral's sliding_window 4096 (null: none),
    Qwen's windows from max_window_layers when layer_types is absent, Qwen3's head_dim 128."""
    import json

    base = {
        "vocab_size": 97,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 160,
    }

    def read(**cfg) -> ArchConfig:
        (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
        return ArchConfig.from_json(tmp_path)

    assert {b.attention.window for b in read(model_type="mistral").blocks} == {4096}
    assert {b.attention.window for b in read(model_type="mistral", sliding_window=None).blocks} == {None}
    qwen = read(model_type="qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=2)
    assert [b.attention.window for b in qwen.blocks] == [None, None, 32, 32]
    assert {b.attention.window for b in read(model_type="qwen2", sliding_window=32).blocks} == {None}
    null = read(model_type="qwen3", use_sliding_window=True, sliding_window=None, max_window_layers=2)
    assert {b.attention.window for b in null.blocks} == {None}  # transformers: every layer full_attention
    assert read(model_type="qwen3").head_dim == 128 and read(model_type="qwen2").head_dim == 8
    from transformers import AutoConfig

    for family in FAMILIES:  # what a bare config defaults to, as transformers' config classes fill it in
        theirs, ours = AutoConfig.for_model(family, **base), read(model_type=family)
        assert ours.rms_norm_eps == theirs.rms_norm_eps and ours.rope.theta == theirs.rope_parameters["rope_theta"]
        assert ours.max_position_embeddings == theirs.max_position_embeddings
        assert ours.head_dim == (getattr(theirs, "head_dim", None) or 64 // 8)


def test_windowed_layers_hold_at_most_their_window_pages(tmp_path) -> None:
    """A windowed layer's KV memory stops growing past its window: its pages form a KV group of their own in
    which a request holds at most `window_pages` pages (window + one step's tokens, in pages, + 1), its last ones,
    however long it grows (an entry of 0 for each page before them), and the group's pool does not grow with the
    context, while the full-attention layers' pages do. (That giving pages back leaves the right logits is
    test_engine_matches_transformers: 44 tokens there, past 28 window_pages' tokens.)"""
    model = load_model(hf_family(tmp_path / "model", "qwen2", tie=False))  # layers 1 and 3: window 16

    def engine(context: int) -> Engine:
        return Engine(model, config=EngineConfig(max_batch=2, max_model_len=context, max_step_tokens=8, page_size=4))

    short, long = engine(64), engine(256)
    full, windowed = long.cache.groups
    assert (full.window, full.layers, full.window_pages) == (None, (0, 2), None)
    assert (windowed.window, windowed.layers, windowed.window_pages) == (WINDOW, (1, 3), (WINDOW + 8) // 4 + 1)
    for layer in (1, 3):  # 2 requests' window_pages and the scratch page, at either context
        assert short.cache.k[layer].shape[0] == long.cache.k[layer].shape[0] == 2 * 7 + 1
    assert (short.cache.k[0].shape[0], long.cache.k[0].shape[0]) == (2 * 16 + 1, 2 * 64 + 1)
    for tokens in (10, 40, 256):
        pages, n = long.cache.allocate(tokens), -(-tokens // 4)
        assert [len(p) for p in pages] == [n, n] and [g.held(p) for g, p in zip(long.cache.groups, pages)] == [
            n,
            min(n, 7),
        ]
        assert pages[1][: n - min(n, 7)] == [0] * (n - min(n, 7)) and 0 not in pages[1][n - min(n, 7) :]
        long.cache.release(pages, tokens)
    assert long.cache.groups[1].available == 2 * 7  # every page back
    # The engine's device-side tables and slots (BlockTables) follow the cache's rule written out, pages given back
    # (0) included.
    tables, lengths = long.tables, (10, 256)
    owned = [long.cache.allocate(n) for n in lengths]
    rows = [tables.add(pages, n) for pages, n in zip(owned, lengths)]
    gathered = tables.gather(rows, torch.tensor(rows))
    for g in range(2):
        expected = [long.cache.table(pages[g], -(-256 // 4)) for pages in owned]
        for b, n in enumerate(lengths):  # entries past a sequence's own pages are never read
            assert gathered[g, b, : -(-n // 4)].tolist() == expected[b][: -(-n // 4)]
    seq = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)])
    positions = torch.tensor([t for n in lengths for t in range(n)])
    slots = tables.slots(gathered, seq, positions)
    for g in range(2):
        assert slots[g].tolist() == [s for pages, n in zip(owned, lengths) for s in long.cache.slots(pages[g], 0, n)]
    # The search prices what the cache keeps: here 7 pages of 4; at the defaults (16-token pages, 512-token steps)
    # a 128-key window keeps 41 pages, 656 tokens, of an 8k context, and all of a 300-token one.
    assert kept_tokens(WINDOW, 256, page_size=4, step_tokens=8) == 7 * 4 and kept_tokens(WINDOW, 20, 4, 8) == 20
    assert kept_tokens(128, 8192) == 656 and kept_tokens(128, 300) == 300 and kept_tokens(None, 8192) == 8192


MIXED = [  # every block kind of a child, windowed and reduced attention among them
    ("gqa", 2, None, "swiglu", 160),
    ("gqa", 1, WINDOW, "swiglu", 64),
    ("linear", None, None, "swiglu", 96),
    ("gqa", 2, 8, "linear", None),
    ("none", None, None, "swiglu", 160),
    ("gqa", 1, None, "none", None),
    ("none", None, None, "none", None),
]


def mixed_child(family: str) -> Model:
    arch = ArchConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        n_heads=8,
        head_dim=16 if family == "qwen3" else 8,
        blocks=tuple(
            BlockConfig(AttentionConfig(a, kv, window=w), FFNConfig(f, width)) for a, kv, w, f, width in MIXED
        ),
        max_position_embeddings=256,
        eos_token_ids=(2,),
        dtype="float32",
        family=family,
    )
    return Model(arch).init_weights(std=0.1, seed=7).eval()


@pytest.mark.parametrize(
    ("family", "fmt"), [("qwen3", "auto"), ("qwen2", "auto"), ("mistral", "auto"), ("llama", "tessera")]
)
def test_a_mixed_child_round_trips_bit_exactly(family, fmt, tmp_path) -> None:
    """A child with windowed, reduced-KV, linear, no-op and pruned blocks saves in tessera's format (its
    family's config.json plus per-layer block_configs: a Qwen or Mistral child by default, a Llama one when
    asked) and loads back with the same architecture, the same weights bit for bit and the same logits."""
    import json
    import warnings

    child = mixed_child(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model(child, tmp_path / "child", fmt=fmt)
    config = json.loads((tmp_path / "child" / "config.json").read_text())
    assert config["model_type"] == family and len(config["block_configs"]) == len(MIXED)
    assert "only tessera reads them" in config["tessera_only"] and caught  # the export says who can load it
    loaded = load_model(tmp_path / "child")
    assert loaded.arch == child.arch
    for (name, a), b in zip(child.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(child(ids), loaded(ids))


def test_a_uniform_family_model_saves_in_its_own_format_for_transformers(tmp_path) -> None:
    """A parent-shaped model of each family writes the family's own config.json (windows through
    layer_types or sliding_window), which transformers loads to the same logits."""
    for family in FAMILIES:
        original = hf_family(tmp_path / family, family, tie=family == "qwen3")
        saved = save_model(load_model(original), tmp_path / f"{family}-saved")
        config = ArchConfig.from_json(saved)
        assert config == ArchConfig.from_json(original) and "block_configs" not in (saved / "config.json").read_text()
        ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert relative_error(hf_model(saved)(ids).logits, hf_model(original)(ids).logits) <= FP32_TOL


def test_padded_decode_step_with_windowed_groups_equals_unpadded(tmp_path) -> None:
    """The CUDA-graph decode step (eager here) over two KV groups, full attention and window pages given back past
    the window: 3 requests padded to 4 give the engine's own logits."""
    from tessera.runtime.engine import DecodeGraphs

    model = load_model(hf_family(tmp_path / "model", "qwen2", tie=False))
    engine = Engine(model, config=EngineConfig(max_batch=4, max_step_tokens=8, page_size=4))
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 5, 21)]
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=10, ignore_eos=True))
    while any(r.computed < r.prompt_len for r in engine.running) or engine.waiting:
        engine.step()
    plan = engine._schedule()
    cache, width = engine.cache, engine.max_pages_per_request
    window_tokens = cache.groups[1].window_pages * cache.page_size
    assert [n for _, n in plan] == [1, 1, 1] and max(r.computed for r, _ in plan) >= window_tokens  # pages given back
    groups = range(len(cache.groups))
    # The engine's device tables hold the cache's rule: a page given back is 0 there too (another request may hold
    # it now), never the page it was.
    for r, _ in plan:
        filled = engine.tables.widths[r.row]
        for g in groups:
            assert engine.tables.tables[g, r.row, :filled].tolist() == cache.table(r.pages[g], filled)
    assert 0 in engine.tables.tables[1, plan[0][0].row].tolist()
    args = (
        torch.tensor([r.tokens[r.computed] for r, _ in plan]),
        torch.tensor([r.computed for r, _ in plan]),
        [torch.tensor([cache.slots(r.pages[g], r.computed, r.computed + 1)[0] for r, _ in plan]) for g in groups],
        torch.tensor([r.computed + 1 for r, _ in plan], dtype=torch.int32),
        [torch.tensor([cache.table(r.pages[g], width) for r, _ in plan], dtype=torch.int32) for g in groups],
    )
    graphs = DecodeGraphs(model, cache, 4, width, capture=False)
    padded = graphs.run(*args)  # writes the same K/V the engine's step writes next, at the same slots
    expected, _ = engine._forward(plan)
    assert relative_error(padded, expected) <= 1e-6


def test_requests_of_a_model_windowed_everywhere_are_admitted_by_their_window_pages(tmp_path) -> None:
    """With every attention layer windowed (Mistral) the first KV group is a windowed one: a request far longer
    than the pool's pages is admitted, since it only ever holds its 7 window_pages, and served to the end."""
    model = load_model(hf_family(tmp_path / "model", "mistral", tie=False))
    engine = Engine(model, config=EngineConfig(max_batch=1, max_step_tokens=8, page_size=4))
    (group,) = engine.cache.groups
    assert group.window == WINDOW and group.window_pages == 7 and engine.cache.usable_pages == 7
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    (completion,) = engine.generate([[5, 6, 7]], params)  # 202 tokens: 51 pages of 4, holding 7 at a time
    assert len(completion.tokens) == 200
