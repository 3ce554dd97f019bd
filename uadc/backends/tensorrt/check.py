"""``uadc check-trt``'s result: the TensorRT Q/DQ rule violations of an ONNX file or an artifact folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from uadc.backends.tensorrt.rules import Violation, check_trt_rules, format_violations, load_qdq_params, walk_nodes
from uadc.config.targets import TARGETS
from uadc.core.constants import MANIFEST_FILE, MODEL_FILE, QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.manifest import read_manifest, verify_files


@dataclass
class TrtRuleCheck:
    model: Path
    violations: list[Violation]
    has_qdq: bool               # a float model passes without being checked
    other_target: str | None    # an artifact of a known non-TensorRT target: said beside the count

    @property
    def exit_code(self) -> int:
        return 1 if self.violations else 0

    def to_dict(self) -> dict:
        """``uadc check-trt --json``'s document."""
        return {"model": str(self.model), "violations": [asdict(v) for v in self.violations],
                "has_qdq": self.has_qdq, "other_target": self.other_target, "exit_code": self.exit_code}

    def lines(self) -> list[str]:
        n = len(self.violations)
        return ([format_violations(self.violations)] if n else []) + [
            f"{self.model}: {n} violation{'' if n == 1 else 's'} of TensorRT Q/DQ rules"
            + ("" if self.has_qdq else " (it has no Q/DQ nodes)")
            + (f"; its target {self.other_target} is not a TensorRT one" if self.other_target else "")]


def check_trt_model(path: Path) -> TrtRuleCheck:
    """The violations in an ONNX file, or in an artifact folder's model.onnx."""
    from uadc.export.onnx_export import load_onnx   # torch: only when a file is checked
    path = Path(path)
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        held = sorted(p.name for p in path.glob("*.onnx") if p.is_file())   # uadc qat's folder: qat_model.onnx
        raise UadcError(f"{path}: a folder without {MODEL_FILE}; give an ONNX file or an artifact folder"
                        + (f" (it holds {len(held)} ONNX files, {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}: "
                           f"give the path of one of them)" if len(held) > 1 else
                           f" (it holds {held[0]}: give {path / held[0]})" if held else ""))
    manifest = read_manifest(path, verify=False) if (path / MANIFEST_FILE).is_file() else None
    if manifest is not None:   # another artifact's model copied in was checked under this folder's target
        verify_files(path, manifest, only=[manifest.model_file])
    file = path / MODEL_FILE if path.is_dir() else path
    model = load_onnx(file)
    try:   # Q/DQ parameters kept as external data were judged as fine, unread
        load_qdq_params(model, file.parent)
    except (OSError, ValueError) as exc:
        raise UadcError(f"cannot read the Q/DQ parameters of {file} (external data): {exc}") from None
    target = manifest.target if manifest is not None else None
    known = TARGETS.get(target) if target else None   # a newer uadc's target: no note
    other = target if known and known.runtime != "tensorrt" else None
    return TrtRuleCheck(path, check_trt_rules(model), any(n.op_type in QDQ_OPS for n in walk_nodes(model.graph)), other)
