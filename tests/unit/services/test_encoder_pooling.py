"""Pooling as the model folder declares it, checked against plain-torch references.

Reproduces sentence-transformers' Pooling module (sentence_transformers/sentence_transformer/
models/Pooling.py: the ``pooling_mode_*`` flags, concatenation order, last-token pooling that
takes the last position the attention mask marks) and its ``modules.json`` module list, on a copy
of the embedded all-MiniLM-L6-v2 folder rewritten to declare other pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmops_services.encoder import EncoderConfigError, TextEncoder, pool, read_pooling
from llmops_services.sources import resolve_source

TEXTS = ["hi", "a much longer sentence about rivers and mountains in Europe", "short one"]


def _model_copy(
    tmp_path: Path,
    pooling: dict[str, Any] | None = None,
    *,
    normalize: bool = True,
    padding_side: str | None = None,
    extra_module: str | None = None,
) -> Path:
    """The embedded encoder's folder with its files linked and its configuration rewritten."""
    source = resolve_source("embedded://all-minilm-l6-v2")
    folder = tmp_path / "model"
    folder.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name not in ("modules.json", "tokenizer_config.json"):
            (folder / item.name).symlink_to(item)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    if padding_side is not None:
        tokenizer_config["padding_side"] = padding_side
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    modules = json.loads((source / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    if extra_module is not None:
        modules.append({"idx": 3, "name": "3", "path": "3_X", "type": extra_module})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    settings = json.loads((source / "1_Pooling" / "config.json").read_text())
    if pooling is not None:
        settings = {"word_embedding_dimension": 384, **pooling}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    return folder


def _reference_states(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return hidden, batch["attention_mask"]


def _last_token_reference(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for row in range(hidden.shape[0]):
        positions = [i for i, on in enumerate(mask[row].tolist()) if on]
        rows.append(hidden[row, positions[-1]])
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_pooling_takes_the_last_real_token(tmp_path: Path, padding_side: str) -> None:
    folder = _model_copy(
        tmp_path,
        {"pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True},
        padding_side=padding_side,
    )
    hidden, mask = _reference_states(folder, TEXTS)
    padded_first = mask[0, 0] == 0  # "hi" is the shortest text: padding shows on its row
    assert bool(padded_first) == (padding_side == "left")
    expected = _last_token_reference(hidden, mask)

    encoder = TextEncoder(folder, device="cpu")
    vectors, counts = encoder.encode(TEXTS)

    assert encoder.pooling.modes == ("lasttoken",)
    assert counts == mask.sum(dim=1).tolist()
    assert torch.allclose(torch.tensor(vectors), expected, atol=1e-5)
    mean = torch.nn.functional.normalize((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, True))
    assert not torch.allclose(torch.tensor(vectors), mean, atol=1e-2)


def test_cls_and_mean_concatenate_in_sentence_transformers_order(tmp_path: Path) -> None:
    folder = _model_copy(
        tmp_path,
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
        normalize=False,
    )
    hidden, mask = _reference_states(folder, TEXTS)
    weights = mask.unsqueeze(-1).float()
    expected = torch.cat([hidden[:, 0], (hidden * weights).sum(1) / weights.sum(1)], dim=1)

    encoder = TextEncoder(folder, device="cpu")
    vectors, _ = encoder.encode(TEXTS)

    assert encoder.dimensions == 768
    assert torch.allclose(torch.tensor(vectors), expected, atol=1e-5)
    assert abs(float(torch.tensor(vectors[0]).norm()) - 1.0) > 0.1  # no Normalize module


def test_pooling_mode_string_and_defaults(tmp_path: Path) -> None:
    assert read_pooling(_model_copy(tmp_path, {"pooling_mode": "CLS"})).modes == ("cls",)
    (tmp_path / "model" / "1_Pooling" / "config.json").write_text("{}")
    assert read_pooling(tmp_path / "model").modes == ("mean",)  # the Pooling module's default


def test_folder_without_modules_is_mean_pooled_and_normalised(tmp_path: Path) -> None:
    folder = _model_copy(tmp_path)
    (folder / "modules.json").unlink()
    pooling = read_pooling(folder)
    assert (pooling.modes, pooling.normalize) == (("mean",), True)


@pytest.mark.parametrize(
    ("pooling", "message"),
    [
        ({"pooling_mode": "attention"}, "unknown pooling_mode 'attention'"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_eos": True}, "'pooling_mode_eos'"),
        ({"pooling_mode_mean_tokens": False}, "no pooling mode"),
    ],
)
def test_unknown_pooling_is_refused_at_load(
    tmp_path: Path, pooling: dict[str, Any], message: str
) -> None:
    with pytest.raises(EncoderConfigError, match=message):
        TextEncoder(_model_copy(tmp_path, pooling), device="cpu")


def test_modules_beyond_pooling_and_normalize_are_refused(tmp_path: Path) -> None:
    folder = _model_copy(tmp_path, extra_module="sentence_transformers.models.Dense")
    with pytest.raises(EncoderConfigError, match=r"sentence_transformers\.models\.Dense"):
        read_pooling(folder)


def test_pool_on_hand_made_states() -> None:
    hidden = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 4.0], [9.0, 9.0]],  # right-padded: 2 tokens
            [[9.0, 9.0], [3.0, 1.0], [5.0, -1.0]],  # left-padded: 2 tokens
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool(hidden, mask, ("lasttoken",)).tolist() == [[2.0, 4.0], [5.0, -1.0]]
    assert pool(hidden, mask, ("mean",)).tolist() == [[1.5, 2.0], [4.0, 0.0]]
    assert pool(hidden, mask, ("max",)).tolist() == [[2.0, 4.0], [5.0, 1.0]]
    # Position weights 1..3 over the unmasked positions, as sentence-transformers weighs them.
    weighted = pool(hidden, mask, ("weightedmean",)).tolist()
    assert weighted[0] == pytest.approx([(1 * 1 + 2 * 2) / 3, (0 + 4 * 2) / 3])
    assert weighted[1] == pytest.approx([(3 * 2 + 5 * 3) / 5, (1 * 2 - 1 * 3) / 5])
