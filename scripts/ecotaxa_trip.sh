#!/usr/bin/env bash
# The EcoTaxa round trip in one command: export -> shards -> bag (+ calibration) -> evaluation ->
# predictions to import back into EcoTaxa (docs/ECOTAXA.md walks through each step).
#
# Usage: scripts/ecotaxa_trip.sh EXPORT.tsv WORK [--slurm] [training overrides for taxotrain-bag ...]
#   EXPORT.tsv  an EcoTaxa export (type row, object_annotation_status); images relative to IMAGES
#   WORK        everything goes here: shards/, bag/ (report.md, calibration.json), ecotaxa_predictions.tsv
#   --slurm     submit the steps as SLURM jobs chained with --dependency=afterok (slurm/*.sbatch)
# Environment: IMAGES (default: the export's folder), MEMBERS (bag size, default 3), PYTHON (default
# python), SBATCH (default sbatch), TAXOTRAIN_SETUP (passed to the sbatch scripts).
# Exit code: that of the first step that fails (1 data, 2 a bad command); 0 when every step (or
# submission) succeeded.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '5,12p' "$0" >&2; exit 2; fi
export_tsv=$1 work=$2
shift 2
slurm=0
if [ "${1:-}" = "--slurm" ]; then slurm=1; shift; fi
images=${IMAGES:-$(dirname "$export_tsv")}
members=${MEMBERS:-3}
PYTHON=${PYTHON:-python}
SBATCH=${SBATCH:-sbatch}
here=$(cd "$(dirname "$0")/.." && pwd)
shards="$work/shards" bag="$work/bag" out="$work/ecotaxa_predictions.tsv"

build=(source=ecotaxa "source.path=$export_tsv" "source.root=$images" source.unlabelled=unlabelled "out=$shards")
train=("bag.members=$members" "data.shards=$shards" "run_dir=$bag" "$@")
evaluate=("bag=$bag" "data.shards=$shards" data.split=test)
predict=("bag=$bag" "input=$shards" split=unlabelled format=ecotaxa "out=$out")

if [ "$slurm" = 0 ]; then
    "$PYTHON" -m shards.build "${build[@]}"
    "$PYTHON" -m shards.verify "dir=$shards"
    "$PYTHON" -m launch.bag "${train[@]}"          # fits bag/calibration.json after the last member
    "$PYTHON" -m launch.evaluate "${evaluate[@]}"
    "$PYTHON" -m launch.predict "${predict[@]}"
    echo "import into EcoTaxa: $out (update of existing objects, including classification)"
    exit 0
fi

mkdir -p "$work"
submit() { "$SBATCH" --parsable "$@" | cut -d';' -f1; }
j_shards=$(submit "$here/slurm/shard.sbatch" "${build[@]}")
j_bag=$(submit --dependency="afterok:$j_shards" --array="0-$((members - 1))" "$here/slurm/bag.sbatch" "${train[@]}")
j_cal=$(submit --dependency="afterok:$j_bag" "$here/slurm/calibrate.sbatch" "bag=$bag" "data.shards=$shards")
j_eval=$(submit --dependency="afterok:$j_cal" "$here/slurm/evaluate.sbatch" "${evaluate[@]}")
j_pred=$(submit --dependency="afterok:$j_cal" "$here/slurm/predict.sbatch" "${predict[@]}")
echo "submitted: shards $j_shards -> bag $j_bag -> calibrate $j_cal -> evaluate $j_eval, predict $j_pred"
echo "when predict $j_pred has finished, import into EcoTaxa: $out"
