"""ONNX export of a checkpoint, and an onnxruntime tile runner that scores without torch.

    export_onnx("demo", "calciscope-demo.onnx")          # needs torch + onnx + onnxscript + onnxruntime
    runner = OnnxTileRunner("calciscope-demo.onnx")      # needs onnxruntime + numpy only
    logits = runner(tiles)                               # uint8 (N, 3, H, W) -> float32 (N, L)
    probs = runner.probabilities(tiles)                  # sigmoid(logit / temperature), the card's temperatures

Slides are scored with an export by ``Predictor(path, PredictConfig(runtime="onnxruntime"))`` (``calciscope
predict/score --runtime onnxruntime``): the runner replaces torch's forward pass, nothing else changes.

The exported graph's one input is ``tiles``: the uint8 tile batch (N, 3, tile_px, tile_px), N dynamic. The
normalisation of ``training.engine.prepare_inputs`` (/255, then the card's mean/std) is inside the graph. Its one
output is ``logits`` (N, L), one per label in the card's order, for a tile model, or ``embeddings`` (N, D) for an
attention-MIL model (``card.head == "mil"``): the attention head is not exported; it pools the embeddings of a whole
slide and stays with the torch checkpoint.

The model card travels inside the ONNX file, as metadata_props (one file to copy; onnxruntime reads it without the
``onnx`` package):

- ``calciscope.format``: ``"1"`` (this layout),
- ``calciscope.output``: ``"logits"`` or ``"embeddings"``,
- ``calciscope.model_card``: the checkpoint's ``model.json`` (labels, tile_px, mpp, mean/std, temperature,
  thresholds, CUA rule, ...),
- ``calciscope.export_check``: JSON of the export-time comparison with torch (max |Δ|, tiles, batch sizes).

Export uses the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9; the
TorchScript-based one is deprecated). Both fold eval-mode BatchNorm into the convolutions, and onnxruntime fuses
what is left, so the checkpoint is exported as it is (no ``inference_backbone`` fusion first). After export,
onnxruntime must reproduce torch's fp32 outputs within 1e-4 (× max(1, |value|)) on random tiles, or the file is not
written.

This module imports neither torch nor torchvision: ``export_onnx`` imports them when called; ``OnnxTileRunner``
never does (``OnnxTileRunner.card``, the full ``ModelCard``, imports ``calciscope.model.card``, which today pulls
torch in; everything the scoring path needs is on the runner itself).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from calciscope.errors import CalciscopeError, CheckpointError

FORMAT_VERSION = 1
INPUT_NAME = "tiles"
KEY_FORMAT = "calciscope.format"
KEY_OUTPUT = "calciscope.output"
KEY_CARD = "calciscope.model_card"
KEY_CHECK = "calciscope.export_check"
TOLERANCE = 1e-4  # |onnxruntime - torch| <= TOLERANCE * max(1, |torch|), fp32
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ModelCard's defaults (kept here so the runner stays torch-free)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install 'calciscope[onnx]'"


# -- export (torch) -----------------------------------------------------------------------------------------------


def export_onnx(model: str | Path, out: str | Path, *, opset: int | None = None) -> Path:
    """Export checkpoint ``model`` (a directory, its model.json, or ``"demo"``) to the ONNX file ``out``.

    ``opset``: the ai.onnx opset to target (None = the exporter's default). The file is written through a temporary
    name and a rename, only after onnxruntime reproduced torch's fp32 outputs within 1e-4 on random tiles.
    Raises ``CheckpointError`` for a missing or broken checkpoint, ``CalciscopeError`` when onnx/onnxscript/
    onnxruntime are missing, the exporter fails, the outputs disagree, or ``out`` cannot be written.
    Returns ``out``.
    """
    import torch

    from calciscope.io import write_bytes_atomic
    from calciscope.model import load_checkpoint
    from calciscope.model.demo import resolve_model

    out = Path(out)
    if out.is_dir():
        raise CalciscopeError(f"{out}: is a directory; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 1):
        raise CalciscopeError(f"opset must be a positive integer, got {opset!r}")
    _require_export_packages()
    source = resolve_model(model)
    net, card = load_checkpoint(source, map_location="cpu")
    _check_writable_file(out)  # before the export, which takes seconds
    net = net.float().eval()
    graph = _export_module(net, card.mean, card.std, embeddings=card.head == "mil").eval()
    output = "embeddings" if card.head == "mil" else "logits"

    example = torch.from_numpy(_random_tiles(2, card.tile_px, seed=0))
    try:
        program = torch.onnx.export(
            graph, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[output],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
            external_data=False, optimize=True, verbose=False,
        )
        proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - exporter errors come in many types; one line for the user
        raise CalciscopeError(f"{source}: ONNX export failed ({type(exc).__name__}: {_first_line(exc)})") from exc

    # verify on the serialized model without metadata first, then attach the card
    check = _compare_with_torch(proto.SerializeToString(), graph, card.tile_px, source)
    meta = {KEY_FORMAT: str(FORMAT_VERSION), KEY_OUTPUT: output, KEY_CARD: card.to_json(),
            KEY_CHECK: json.dumps(check)}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "calciscope"
    proto.doc_string = f"calciscope {card.name} {card.version}: uint8 tiles (N, 3, {card.tile_px}, {card.tile_px}) " \
                       f"-> {output}"
    blob = proto.SerializeToString()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, blob)
    except OSError as exc:
        raise CalciscopeError(f"{out}: cannot write the ONNX file ({exc.strerror or type(exc).__name__})") from None
    return out


def _check_writable_file(out: Path) -> None:
    """One line now, rather than after the export, when ``out`` cannot be written (nothing is left behind)."""
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CalciscopeError(f"{out}: cannot write the ONNX file ({blocker} is a file, not a folder)")
    created = [p for p in reversed(out.parents) if not p.exists()]
    probe = out.with_name(f".{out.name}.{os.getpid()}.write-test")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CalciscopeError(f"{out}: cannot write the ONNX file ({exc.strerror or type(exc).__name__})") from None
    finally:
        for folder in reversed(created):  # folders made only for the probe go again; export makes them for real
            try:
                folder.rmdir()
            except OSError:
                pass


def _require_export_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CalciscopeError(f"ONNX export needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


def _tiles_to_output_class():
    import torch
    from torch import nn

    class TilesToOutput(nn.Module):
        """uint8 tiles -> prepare_inputs' normalisation -> backbone -> head (tile) or embeddings (MIL)."""

        def __init__(self, model: nn.Module, mean, std, embeddings: bool):
            super().__init__()
            self.model = model
            self.embeddings = embeddings
            # names no aten op output takes ("mean" clashes with the global-pool's mean in unoptimised graphs)
            self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:
            x = (tiles.float() / 255.0 - self.input_mean) / self.input_std
            return self.model.embed(x) if self.embeddings else self.model(x)

    return TilesToOutput


def _export_module(model, mean, std, *, embeddings: bool):
    """The module that is exported (its class is built on first use, so importing this module needs no torch)."""
    return _tiles_to_output_class()(model, mean, std, embeddings)


def _random_tiles(n: int, tile_px: int, seed: int) -> np.ndarray:
    """Random uint8 tiles with some structure (smooth blobs plus noise), so activations are not all alike."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((1, 1, math.ceil(tile_px / 4), math.ceil(tile_px / 4)), np.float32))
    smooth = smooth[:, :, :tile_px, :tile_px]
    noisy = smooth + rng.normal(0, 40, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _compare_with_torch(blob: bytes, graph, tile_px: int, source: Path) -> dict[str, Any]:
    import torch

    try:
        session = _session(blob, threads=None)
    except Exception as exc:  # noqa: BLE001
        raise CalciscopeError(f"{source}: onnxruntime cannot load the ONNX export ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    worst, batches = 0.0, (1, 3)
    for i, n in enumerate(batches):
        tiles = _random_tiles(n, tile_px, seed=1 + i)
        with torch.inference_mode():
            want = graph(torch.from_numpy(tiles)).float().numpy()
        got = session.run(None, {INPUT_NAME: tiles})[0]
        if got.shape != want.shape:
            raise CalciscopeError(f"{source}: the ONNX export gives shape {got.shape} where torch gives {want.shape}")
        if not np.all(np.isfinite(got)):
            raise CalciscopeError(f"{source}: the ONNX export gives non-finite outputs on random tiles")
        excess = np.abs(got - want) / np.maximum(1.0, np.abs(want))
        worst = max(worst, float(excess.max()))
    if worst > TOLERANCE:
        raise CalciscopeError(f"{source}: onnxruntime does not reproduce torch (fp32) after export: "
                              f"max |Δ| / max(1, |torch|) = {worst:.2e} > {TOLERANCE:.0e}")
    return {"max_scaled_abs_diff": worst, "tolerance": TOLERANCE, "batches": list(batches),
            "torch": torch.__version__, "onnxruntime": _ort().__version__}


# -- runtime (no torch) -------------------------------------------------------------------------------------------


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise CalciscopeError(f"the onnxruntime runtime needs the onnxruntime package (not installed): "
                              f"{INSTALL_HINT}") from None
    return onnxruntime


def default_threads() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _session(model: bytes | str, threads: int | None):
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


ONNX_FILE = "model.onnx"  # the name an export takes inside a checkpoint folder, where scoring looks for it


def resolve_onnx_model(spec: str | Path) -> Path:
    """The ONNX file the onnxruntime runtime scores with: ``spec`` itself, or ``spec/model.onnx`` for a checkpoint
    folder that holds one. A torch checkpoint without an export (``"demo"`` included) is one line that says how to
    make one."""
    path = Path(spec)
    if str(spec) == "demo" and not path.exists():
        raise CheckpointError("demo", "the demo model is a torch checkpoint; for the onnxruntime runtime export it "
                                      "first: calciscope export --model demo --format onnx --out calciscope-demo.onnx")
    if path.is_dir():
        if (path / ONNX_FILE).is_file():
            return path / ONNX_FILE
        raise CheckpointError(path, f"no {ONNX_FILE} in this folder; the onnxruntime runtime scores an ONNX export: "
                                    f"calciscope export --model {path} --format onnx --out {path / ONNX_FILE}")
    return path


class OnnxTileRunner:
    """An exported calciscope model in onnxruntime (CPU): uint8 tiles in, logits (or MIL embeddings) out.

    Attributes (all torch-free): ``path``, ``output`` ("logits" | "embeddings"), ``labels``, ``tile_px``, ``mpp``,
    ``temperature`` (float32 (L,), label order), ``thresholds`` (label -> threshold, 0.5 where the card has none),
    ``card_dict`` (the embedded model.json), ``export_check``, ``threads``. ``card`` is the validated ``ModelCard``
    (built on first access; ``calciscope.model.card`` imports torch).
    Any problem with the file is one ``CheckpointError`` line naming it.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        if threads is not None and threads < 1:
            raise CalciscopeError(f"threads must be at least 1, got {threads}")
        self.threads = threads or default_threads()
        if not self.path.is_file():
            reason = "is a directory, not an ONNX file" if self.path.is_dir() else "ONNX model not found"
            raise CheckpointError(self.path, reason)
        ort = _ort()
        try:
            self._session = _session(str(self.path), self.threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad protobufs / graphs
            raise CheckpointError(self.path, f"not a readable ONNX model ({type(exc).__name__}: "
                                             f"{_first_line(exc)})") from None
        meta = dict(self._session.get_modelmeta().custom_metadata_map or {})
        if KEY_CARD not in meta or KEY_FORMAT not in meta:
            raise CheckpointError(self.path, "not a calciscope ONNX export (no model card in its metadata; "
                                             "make one with `calciscope export --format onnx`)")
        try:
            version = int(meta[KEY_FORMAT])
        except ValueError:
            raise CheckpointError(self.path, f"bad {KEY_FORMAT} {meta[KEY_FORMAT]!r:.40}") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(self.path, f"calciscope ONNX format {version} is newer than this calciscope "
                                             f"reads ({FORMAT_VERSION})")
        try:
            self.card_dict: dict[str, Any] = json.loads(meta[KEY_CARD])
        except json.JSONDecodeError as exc:
            raise CheckpointError(self.path, f"the embedded model card is not valid JSON ({exc})") from None
        try:
            self.export_check: dict[str, Any] = json.loads(meta.get(KEY_CHECK, "{}"))
        except json.JSONDecodeError:
            self.export_check = {}
        self.output = meta.get(KEY_OUTPUT, "logits")
        self._read_card()
        self._check_graph(ort)
        self._card = None

    def _read_card(self) -> None:
        """The fields scoring needs, checked without ``ModelCard`` (which imports torch)."""
        c = self.card_dict

        def bad(reason: str) -> CheckpointError:
            return CheckpointError(self.path, f"the embedded model card is not valid: {reason}")

        if not isinstance(c, dict):
            raise bad(f"expected a JSON object, got {type(c).__name__}")
        labels = c.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(s, str) and s for s in labels)
                and len(set(labels)) == len(labels)):
            raise bad(f"field 'labels' must be a non-empty list of distinct strings, got {labels!r:.80}")
        tile_px, mpp = c.get("tile_px"), c.get("mpp")
        if not (isinstance(tile_px, int) and not isinstance(tile_px, bool) and tile_px > 0):
            raise bad(f"field 'tile_px' must be a positive integer, got {tile_px!r:.40}")
        if not (_is_num(mpp) and mpp > 0):
            raise bad(f"field 'mpp' must be a positive number, got {mpp!r:.40}")
        head = c.get("head", "tile")
        if self.output not in ("logits", "embeddings") or (head == "mil") != (self.output == "embeddings"):
            raise bad(f"head {head!r} does not match the graph's output {self.output!r}")
        temperature = {**{label: 1.0 for label in labels}, **(c.get("temperature") or {})}
        thresholds = c.get("thresholds") or {}
        for name, values in (("temperature", temperature), ("thresholds", thresholds)):
            if not isinstance(values, dict) or set(values) - set(labels) or not all(_is_num(v) for v in values.values()):
                raise bad(f"field '{name}' must map labels to numbers, got {values!r:.80}")
        if any(t <= 0 for t in temperature.values()):
            raise bad("field 'temperature' values must be > 0")
        self.labels: list[str] = list(labels)
        self.head: str = head
        self.tile_px: int = tile_px
        self.mpp = float(mpp)
        self.mean = [float(v) for v in c.get("mean", IMAGENET_MEAN)]
        self.std = [float(v) for v in c.get("std", IMAGENET_STD)]
        self.temperature = np.array([temperature[label] for label in self.labels], np.float32)
        self.thresholds = {label: float(thresholds.get(label, 0.5)) for label in self.labels}

    def _check_graph(self, ort) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)" \
                or len(inputs[0].shape) != 4:
            got = [(i.name, i.type, i.shape) for i in inputs]
            raise CheckpointError(self.path, f"not a calciscope tile graph: expected one input '{INPUT_NAME}' "
                                             f"uint8 (N, 3, H, W), got {got}")
        shape = inputs[0].shape
        if shape[1] != 3 or shape[2:] != [self.tile_px, self.tile_px]:
            raise CheckpointError(self.path, f"input shape {shape} does not fit the card's "
                                             f"{self.tile_px} px RGB tiles")
        if len(outputs) != 1 or outputs[0].name != self.output or len(outputs[0].shape) != 2:
            got = [(o.name, o.shape) for o in outputs]
            raise CheckpointError(self.path, f"expected one output '{self.output}' (N, K), got {got}")
        width = outputs[0].shape[1]
        if self.output == "logits" and isinstance(width, int) and width != len(self.labels):
            raise CheckpointError(self.path, f"the graph gives {width} logits but the card has "
                                             f"{len(self.labels)} labels")
        self._output_name = outputs[0].name

    @property
    def card(self):
        """The embedded card as a validated ``calciscope.model.ModelCard`` (imports torch, today)."""
        if self._card is None:
            from calciscope.model.card import ModelCard

            self._card = ModelCard.from_dict(self.card_dict, source=self.path)
        return self._card

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles (N, 3, tile_px, tile_px) -> float32 logits (N, L) (MIL exports: embeddings (N, D))."""
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (3, self.tile_px, self.tile_px):
            raise CalciscopeError(f"{self.path.name}: expected uint8 tiles (N, 3, {self.tile_px}, {self.tile_px}), "
                                  f"got {tiles.dtype} {tiles.shape}")
        if len(tiles) == 0:
            width = len(self.labels) if self.output == "logits" else self._session.get_outputs()[0].shape[1]
            return np.zeros((0, width if isinstance(width, int) else 0), np.float32)
        out = self._session.run([self._output_name], {INPUT_NAME: np.ascontiguousarray(tiles)})[0]
        return np.asarray(out, dtype=np.float32)

    def probabilities(self, tiles: np.ndarray) -> np.ndarray:
        """Calibrated tile probabilities ``sigmoid(logit / temperature)`` (N, L) float32, like ``Predictor``."""
        if self.output != "logits":
            raise CalciscopeError(f"{self.path.name}: an attention-MIL export gives tile embeddings, not tile "
                                  f"probabilities (the attention head runs on the torch checkpoint)")
        return sigmoid(self(tiles) / self.temperature)

    def __repr__(self) -> str:
        return (f"OnnxTileRunner({str(self.path)!r}, output={self.output!r}, labels={self.labels}, "
                f"tile_px={self.tile_px}, threads={self.threads})")


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    z = np.asarray(z, dtype=np.float32)
    return np.exp(-np.logaddexp(np.float32(0), -z)).astype(np.float32)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
