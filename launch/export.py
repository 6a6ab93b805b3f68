"""`python -m launch.export bag=DIR [members=[a,b]] [checkpoint=best|latest] [out=DIR]` (`taxotrain-export`).

Writes each member as `<name>.safetensors` + `<name>.json` and a `bag.json` into `out` (default
`<bag>/export`), with the bag's temperatures and acceptance thresholds when it has a
`calibration.json` (`calibration=none` leaves them out): loadable without pickle
(`trainer/inference/export.py: load_exported_bag`).
Schema: `trainer/inference/config.py: ExportConfig`. Exit codes: 0 done; 2 a bad command (a missing
bag, no checkpoint, a corrupt checkpoint, unknown members).
"""
from __future__ import annotations

from pathlib import Path

from trainer.inference.config import ExportConfig
from trainer.inference.export import export_bag
from trainer.runtime import cli


def export(cfg: ExportConfig) -> int:
    out, metas = export_bag(Path(cfg.bag), cfg.members, cfg.checkpoint, Path(cfg.out) if cfg.out else None,
                            cfg.calibration)
    names = ", ".join(f"{m['name']} ({m['model']}, step {m['step']})" for m in metas)
    print(f"exported {names} to {out}; load with "
          f"trainer.inference.export.load_exported_bag({str(out)!r})")
    return 0


main = cli.tool("export", ExportConfig, export, __doc__)

if __name__ == "__main__":
    main()
