"""Commands that move integer models between photosim and ONNX: export to an ONNX file, import one (docs/onnx.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from photosim.cli.common import app, console, handles_errors, preflight
from photosim.errors import PhotosimError

VerifyOpt = Annotated[int, typer.Option(
    min=0, help="Also run the ONNX file in ONNX Runtime on this many random inputs and count the output codes equal "
                "to photosim's onnxruntime requant mode (needs the onnxruntime package).")]


def _report_agreement(qmodel: Any, proto: Any, codes: str, offset: int, samples: int) -> None:
    """Print how many output codes ONNX Runtime and photosim's onnxruntime mode share; exit 1 when some differ."""
    from photosim.engine.onnx_requant import agreement

    equal, total = agreement(qmodel, proto, codes, offset, samples)
    console.print(f"ONNX Runtime vs photosim --requant onnxruntime on {samples} random inputs: {equal:,} of "
                  f"{total:,} output codes equal ({100 * equal / max(total, 1):.2f}%)")
    if equal != total:
        raise typer.Exit(1)


@app.command("export")
@handles_errors
def export_cmd(
    model_file: Annotated[Path, typer.Argument(help="Integer model file to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write (.onnx).")],
    form: Annotated[str, typer.Option(help="qdq (standard QuantizeLinear / DequantizeLinear around float ops) or "
                                           "qoperator (ONNX Runtime's QLinear kernels).")] = "qdq",
    verify: VerifyOpt = 0,
) -> None:
    """Write an integer model as an ONNX graph (opset 13) that ONNX Runtime runs on the CPU."""
    from photosim.ir.format import load
    from photosim.ir.onnx_export import export_onnx

    preflight({"--output": output}, {"MODEL_FILE": model_file})
    qmodel = load(model_file)
    proto = export_onnx(qmodel, output, form)
    meta = {p.key: p.value for p in proto.metadata_props}
    console.print(f"wrote {output} (ONNX opset {meta['photosim.opset']}, {form} form, {len(proto.graph.node)} ONNX "
                  f"nodes for {len(qmodel.nodes)} photosim nodes); what ONNX cannot state is in its metadata")
    if verify:
        codes = json.loads(meta["photosim.codes"])[qmodel.output]
        _report_agreement(qmodel, proto, codes, json.loads(meta["photosim.code_offsets"]).get(qmodel.output, 0),
                          verify)


@app.command("import-onnx")
@handles_errors
def import_onnx_cmd(
    onnx_file: Annotated[Path, typer.Argument(help="Quantized ONNX model (QDQ, QOperator or QCDQ form).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Integer model file to write.")],
    verify: VerifyOpt = 0,
) -> None:
    """Convert a quantized ONNX model (ONNX Runtime's quantize_static, Brevitas' QCDQ export) into an integer file."""
    from photosim.frontend.onnx_import import import_onnx, output_codes, read_onnx

    preflight({"--output": output}, {"ONNX_FILE": onnx_file})
    qmodel = import_onnx(onnx_file, output)
    shape = "x".join(map(str, qmodel.input_shape))
    console.print(f"wrote {output} ({len(qmodel.nodes)} nodes, input {shape}); simulate it with `photosim run "
                  f"{output} --requant onnxruntime`")
    if verify:
        proto = read_onnx(onnx_file)
        codes = output_codes(proto)
        if codes is None:
            raise PhotosimError(f"{onnx_file}: the graph output is not the DequantizeLinear of integer codes, so "
                                "--verify has no codes to compare.")
        _report_agreement(qmodel, proto, codes, 0, verify)
