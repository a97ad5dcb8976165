"""Text encoder (T5 + projections, static length) and tokenizer against the golden text tensors."""

import json

import pytest
import torch

from kvt.models.text_encoder import TINY_TOKENIZER_DIR, PromptTokenizer, text_context_length, trim_context
from support import refdata

TEXT_FILE = "text/text_encoder.safetensors"
TOKENIZER_FILE = "text/tokenizer_cases.json"


@pytest.fixture(scope="module")
def reference_encoder():
    ref = refdata.require_reference()
    configs = refdata.configs_json()
    t5_dir = ref / "checkpoints" / configs["text_encoder"]["weights_path"]
    encoder = refdata.models().text_encoder
    return encoder, t5_dir, configs["text_encoder"]["tokens_length"]


def _atol() -> float:
    return refdata.recommended_atol(refdata.case_name(TEXT_FILE))


def _check(name: str, ours: torch.Tensor, golden: torch.Tensor) -> float:
    assert ours.shape == golden.shape, f"{name}: shape {list(ours.shape)} != {list(golden.shape)}"
    err = (ours.float() - golden.float()).abs().max().item()
    assert err <= _atol(), f"{name}: max abs error {err:.2e} > {_atol():.0e}"
    return err


def test_hidden_states_and_raw_projections(reference_encoder):
    encoder, _, _ = reference_encoder
    golden = refdata.load_tensors(TEXT_FILE)
    with torch.inference_mode():
        hidden = encoder.hidden_states(golden["input_ids"], golden["attention_mask"])
        _check("last_hidden_state", hidden, golden["last_hidden_state"])
        _check("projection_base_raw", encoder.project(hidden, "projection_base"), golden["projection_base_raw"])
        _check("projection_interpolation_raw", encoder.project(hidden, "projection_interpolation"),
               golden["projection_interpolation_raw"])


def _rows_of(golden: dict[str, torch.Tensor], case: str) -> list[list[int]]:
    """Which prompts (rows of input_ids) a stored context case can be: every row for a case of the
    whole batch, else each single row whose official trimmed length equals the case's."""
    batch = golden["input_ids"].shape[0]
    stored = golden[f"{case}.context"]
    if stored.shape[0] == batch and stored.shape[0] > 1:
        return [list(range(batch))]
    mask = golden["attention_mask"]
    return [[row] for row in range(batch)
            if int(text_context_length(mask[row:row + 1])[0]) == stored.shape[1]]


def test_trimmed_contexts(reference_encoder):
    """Static-length output, trimmed the official way, equals every stored pipeline context (each
    case is matched with the prompt of the same trimmed length; the manifest lists the prompts)."""
    encoder, _, _ = reference_encoder
    golden = refdata.load_tensors(TEXT_FILE)
    cases = sorted({k.rsplit(".context", 1)[0] for k in golden if k.endswith(".context")})
    assert cases, "no context cases in the text file"
    prompts = refdata.file_entry(TEXT_FILE).get("meta", {}).get("prompts")
    if prompts is not None:
        assert len(prompts) == golden["input_ids"].shape[0]
    for case in cases:
        head = case.split(".", 1)[1]
        candidates = _rows_of(golden, case)
        assert candidates, f"{case}: no prompt has its trimmed length {golden[f'{case}.context'].shape[1]}"
        errors = []
        for rows in candidates:
            ids, mask = golden["input_ids"][rows], golden["attention_mask"][rows]
            with torch.inference_mode():
                context = encoder(ids, mask, head=head)
            assert (context[mask == 0] == 0).all(), "padded rows must be exactly zero"
            trimmed, trimmed_mask = trim_context(context, mask)
            assert int(text_context_length(mask).max()) == golden[f"{case}.context"].shape[1]
            if torch.equal(trimmed_mask, golden[f"{case}.context_mask"]) and \
                    trimmed.shape == golden[f"{case}.context"].shape:
                errors.append((trimmed.float() - golden[f"{case}.context"].float()).abs().max().item())
        assert errors and min(errors) <= _atol(), (
            f"{case}: no prompt of the text file reproduces it (max abs errors {errors}, atol {_atol():.0e})")


def test_tokenizer_cases(reference_encoder):
    _, t5_dir, tokens_length = reference_encoder
    cases = json.loads((refdata.reference_dir() / TOKENIZER_FILE).read_text())
    tokenizer = PromptTokenizer(t5_dir, cases["tokens_length"])
    for case in cases["cases"]:
        tokens = tokenizer(case["text"])
        assert tokens.input_ids[0].tolist() == case["input_ids"], case["text"]
        assert tokens.attention_mask[0].tolist() == case["attention_mask"], case["text"]
        assert tokens.n_tokens == sum(case["attention_mask"])
        assert tokens.truncated == (len(case["sentencepiece_encode"]) + 1 > tokens_length)


def test_embedded_tiny_tokenizer_reports_truncation():
    tokenizer = PromptTokenizer(TINY_TOKENIZER_DIR, 16)
    assert tokenizer.vocab_size <= 256  # fits the tiny T5 vocabulary
    short = tokenizer("a cat")
    assert not short.truncated and short.input_ids.shape == (1, 16) and short.input_ids[0, short.n_tokens - 1] == 1
    long = tokenizer("a red car is drifting on the mountain road, close view, fast movement")
    assert long.truncated and long.n_tokens == 16 and long.n_tokens_requested > 16
    assert long.input_ids[0, -1].item() == 1  # EOS kept at the end, as the official call does


def test_full_size_text_encoder_parameter_counts():
    """Spec checkpoints.md: Flan-UL2 encoder 8,721,797,632 params (8,590,201,344 without the token
    embedding); each T5 projection 16,785,408. Built on the meta device."""
    from transformers import T5Config, T5EncoderModel

    from kvt.models import FULL
    from kvt.models.text_encoder import TextEncoder

    with torch.device("meta"):
        encoder = TextEncoder(T5EncoderModel(T5Config(**FULL.t5)), FULL.config.text_encoder.context_dim)
    t5_params = sum(p.numel() for p in encoder.t5.parameters())
    assert t5_params == 8_721_797_632
    assert t5_params - encoder.t5.shared.weight.numel() == 8_590_201_344
    for head in ("projection_base", "projection_interpolation"):
        assert sum(p.numel() for p in getattr(encoder, head).parameters()) == 16_785_408
