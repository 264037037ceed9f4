"""Export a model directory to ONNX (fp32, or int8 by onnxruntime dynamic quantization).

One graph serves prefill (empty past) and decode::

    inputs : input_ids [batch, seq] int64,
             past.{i}.key / past.{i}.value [batch, n_kv_heads, past_len, head_dim] float32
    outputs: logits [batch, seq, vocab] float32,
             present.{i}.key / present.{i}.value [batch, n_kv_heads, past_len + seq, head_dim]

Positions continue after ``past_len``. Metadata (``metadata_props``): ``edgellm.*`` shape
fields, ``edgellm.config`` (config.json), ``edgellm.tokenizer`` (tokenizer.json, converted from a
sentencepiece tokenizer.model if that is all the model has) and ``edgellm.chat_template`` (the
model's own template) so the file is self-contained; ``tokenizer.json`` is also copied next to the file when absent there.
Every export writes ``<file>.report.json`` with the evaluation (unless ``evaluate=False``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from edgellm._fs import atomic_write
from edgellm.errors import BuildError
from edgellm.pipeline._atomic import atomic_file, check_output_path
from edgellm.pipeline.tokenizer import chat_template_of, tokenizer_json_text

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8")
MAX_SINGLE_FILE_BYTES = 1900 * 2**20  # protobuf's 2 GiB limit, minus room for metadata


def _wrapper(model):
    import torch

    n_layers = model.config.num_hidden_layers

    class OnnxLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids, *past_flat):
            past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(n_layers)]
            logits, presents = self.lm(input_ids, past)
            flat = []
            for k, v in presents:
                flat += [k, v]
            return (logits, *flat)

    return OnnxLM().eval()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids"], ["logits"]
    for i in range(n_layers):
        ins += [f"past.{i}.key", f"past.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def _export_fp32(model, path: Path) -> str:
    """Export with the dynamo exporter; fall back to the legacy (TorchScript) exporter."""
    import torch

    cfg = model.config
    L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim_
    wrapper = _wrapper(model)
    ids = torch.zeros((2, 3), dtype=torch.int64)
    past = tuple(torch.zeros((2, nkv, 4, hd)) for _ in range(2 * L))
    ins, outs = io_names(L)
    try:
        from torch.export import Dim

        batch, seq, plen = (
            Dim("batch", min=1, max=1024),
            Dim("seq", min=1, max=cfg.max_position_embeddings),
            Dim("past", min=0, max=cfg.max_position_embeddings),
        )
        dyn = ({0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in range(2 * L)))
        noisy = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    wrapper,
                    (ids, *past),
                    dynamo=True,
                    input_names=ins,
                    output_names=outs,
                    dynamic_shapes=dyn,
                    optimize=True,
                    verbose=False,
                )
                if prog is None:  # only the legacy exporter returns None; dynamo=True always gives a program
                    raise BuildError(
                        "torch.onnx.export returned no program", hint="check the torch and onnxscript versions"
                    )
                prog.save(str(path))
        finally:
            noisy.setLevel(level)
        _check_dynamic(path, L)
        return "dynamo"
    except Exception as e:  # noqa: BLE001 - any exporter failure: try the legacy exporter
        log.warning("dynamo ONNX export failed (%s); using the legacy exporter", str(e).splitlines()[0][:200])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for i in range(L):
        for kind in ("key", "value"):
            axes[f"past.{i}.{kind}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, *past),
            str(path),
            input_names=ins,
            output_names=outs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return "torchscript"


def _check_dynamic(path: Path, n_layers: int) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in m.graph.input]
    if names != io_names(n_layers)[0]:
        raise BuildError(f"unexpected ONNX inputs {names}")
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        if not dims[0].dim_param:
            raise BuildError(f"ONNX input {i.name} has a static batch axis")


def _add_metadata(path: Path, model_dir: Path, cfg, fmt: str, exporter: str) -> None:
    import onnx

    m = onnx.load(str(path))
    props = {
        "edgellm.format": fmt,
        "edgellm.exporter": exporter,
        "edgellm.num_layers": str(cfg.num_hidden_layers),
        "edgellm.num_kv_heads": str(cfg.num_key_value_heads),
        "edgellm.head_dim": str(cfg.head_dim_),
        "edgellm.vocab_size": str(cfg.vocab_size),
        "edgellm.context_length": str(cfg.max_position_embeddings),
        "edgellm.bos_token_id": json.dumps(cfg.bos_token_id),
        "edgellm.eos_token_id": json.dumps(cfg.eos_token_id),
        "edgellm.config": cfg.to_json(),
    }
    props["edgellm.tokenizer"] = tokenizer_json_text(model_dir)
    if (model_dir / "tokenizer_config.json").exists():
        props["edgellm.tokenizer_config"] = (model_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    template = chat_template_of(model_dir)
    if template:
        props["edgellm.chat_template"] = template
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "edgellm"
    onnx.save(m, str(path))


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _quantize_int8(src: Path, dst: Path, work: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception as e:  # noqa: BLE001 - symbolic shape inference is optional
        log.warning("quantization preprocess with symbolic shapes failed (%s); retrying without", e)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(
        str(pre),
        str(dst),
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gather"],
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "onnx",
    overwrite: bool = True,
    evaluate: bool = True,
    eval_data: Any = None,
    eval_windows: int = 8,
    fp32_source: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``model_dir`` to ``out`` in ``fmt`` (``onnx`` or ``onnx-int8``); returns the report.

    ``fp32_source``: an fp32 export of this same model made earlier (the build's ``onnx-fp32``
    candidate); int8 then quantizes it instead of exporting again (the torch export is most of the
    time an ONNX candidate takes).

    The file appears atomically; ``<out>.report.json`` holds size and (with ``evaluate``)
    perplexity, bits/byte, KL and top-1 agreement vs the fp32 torch model, and decode tokens/s.
    """
    import torch

    from edgellm.pipeline.model import load_model

    if fmt not in FORMATS:
        raise BuildError(f"unknown ONNX format {fmt!r}", hint=f"use one of {FORMATS}")
    model_dir, out = Path(model_dir), Path(out)
    check_output_path(out, overwrite)
    model = load_model(model_dir)
    n_bytes = 4 * model.num_parameters()
    if n_bytes > MAX_SINGLE_FILE_BYTES:
        raise BuildError(
            f"{model_dir}: {n_bytes / 2**30:.1f} GiB of fp32 weights exceed ONNX's 2 GiB single-file limit",
            hint="export this model to GGUF (--format gguf-q4_k_m ...) instead",
        )
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=".edgellm-export-", dir=out.parent if out.parent.exists() else None) as td:
        work = Path(td)
        fp32 = work / "model.onnx"
        if fp32_source is not None:
            shutil.copyfile(fp32_source, fp32)
            exporter = _metadata(fp32).get("edgellm.exporter", "unknown")
        else:
            exporter = _export_fp32(model, fp32)
            _add_metadata(fp32, model_dir, model.config, "onnx", exporter)
        with atomic_file(out, overwrite=overwrite) as tmp:
            if fmt == "onnx":
                shutil.copyfile(fp32, tmp)
            else:
                q = work / "model.int8.onnx"
                _quantize_int8(fp32, q, work)
                _add_metadata(q, model_dir, model.config, fmt, exporter)
                shutil.copyfile(q, tmp)
    if not (out.parent / "tokenizer.json").exists():
        atomic_write(out.parent / "tokenizer.json", tokenizer_json_text(model_dir).encode("utf-8"))
    if (model_dir / "tokenizer_config.json").exists() and not (out.parent / "tokenizer_config.json").exists():
        shutil.copyfile(model_dir / "tokenizer_config.json", out.parent / "tokenizer_config.json")
    report: dict[str, Any] = {
        "kind": "export",
        "format": fmt,
        "file": out.name,
        "exporter": exporter,
        "size_bytes": out.stat().st_size,
        "model_dir": str(model_dir),
        "params": model.num_parameters(),
    }
    if evaluate:
        from edgellm.pipeline.evaluate import evaluate_artifact

        report["eval"] = evaluate_artifact(
            out, model_dir=model_dir, data=eval_data, max_windows=eval_windows, reference=model
        )
    atomic_write(report_path(out), (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return report


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")
