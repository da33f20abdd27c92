#!/usr/bin/env bash
# Reruns every section of docs/results.md (digits and MNIST-100, 3 seeds each)
# in two parallel streams (the small models leave CPU cores idle in one).
# Finished runs under $ROOT are read back, so rerunning continues where it
# stopped. Usage: bash benchmarks/run_results.sh [ROOT]  (logs in ROOT/*.log)
# Streams 3 (VAT's MNIST-100 reproduction and the equal-budget tables) and 4
# (the MNIST-100 teacher-student tables) first copy back the runs kept in
# docs/runs/ by earlier sessions, and keep each finished run there
# (`benchmarks.archive`), so they can span several sessions:
#   STREAMS=3 bash benchmarks/run_results.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/tmp/r2d2_jax/results_v3}
MNIST=${MNIST:-../shared/data/mnist}
TFDS=${TFDS:-/tmp/tfdsmnist}
mkdir -p "$ROOT"
M=(--override "data.manual_dir=$MNIST" --override "data.data_dir=$TFDS")
R() { python -m benchmarks.results --seeds 0 1 2 --write "$@"; }

stream1() {
  R --config configs/digits_quickstart.py --root "$ROOT/digits_quickstart" \
    --title 'Digits, 50 labels: every method of the quick start (configs/digits_quickstart.py)'
  R --config configs/semimeta_mnist.py --root "$ROOT/semimeta_mnist" "${M[@]}" \
    --title 'MNIST, 100 labels: SemiMeta (configs/semimeta_mnist.py)'
  # SemiMeta's settings, chosen again on the validation split (seed 0).
  for v in "meta_bn_train:--override semimeta.meta_bn=train" \
           "label_lr_10:--override semimeta.label_lr=10" \
           "no_aug_meta_bn_train:--override semimeta.meta_bn=train --override data.augment.weak.translate=0"; do
    n=${v%%:*}; o=${v#*:}
    # shellcheck disable=SC2086
    python -m benchmarks.results --seeds 0 --write --config configs/semimeta_mnist.py \
      --root "$ROOT/semimeta_mnist_$n" "${M[@]}" $o --name "semimeta_mnist_$n" \
      --title "MNIST, 100 labels: SemiMeta ablation, $n (seed 0)"
  done
}

stream2() {
  R --config configs/r2d2_mnist.py:translate --root "$ROOT/r2d2_mnist_translate" "${M[@]}" \
    --title 'MNIST, 100 labels, MLP with ±2 px translations'
  R --config configs/mpl_mnist.py --root "$ROOT/mpl_mnist" "${M[@]}" \
    --title 'MNIST, 100 labels: Meta Pseudo Labels (configs/mpl_mnist.py)'
  R --config configs/r2d2_mnist.py --root "$ROOT/r2d2_mnist" "${M[@]}" \
    --title 'MNIST, 100 labels, permutation-invariant MLP (no augmentation)'
  # The FixMatch variants on digits (FixMatch's network, views and optimizer).
  for m in flexmatch freematch softmatch adamatch; do
    R --config "configs/${m}_digits.py" --root "$ROOT/${m}_digits" --name "${m}_digits"
  done
  R --config configs/fixmatch_digits.py:cta --root "$ROOT/fixmatch_cta_digits" \
    --name fixmatch_cta_digits
  # Noisy Student and DeiT-style distillation (teacher-student self-training).
  R --config configs/noisy_student_digits.py --root "$ROOT/noisy_student_digits" \
    --name noisy_student_digits \
    --title 'Digits, 50 labels: Noisy Student, a teacher and two rounds (configs/noisy_student_digits.py)'
  python -m benchmarks.noisy_student_rounds --root "$ROOT/noisy_student_digits" \
    --seeds 0 1 2 --name noisy_student_digits --write \
    --title 'Digits, 50 labels: Noisy Student, pseudo-labels per round (configs/noisy_student_digits.py)'
  for k in hard soft token; do
    R --config "configs/distill_digits.py:$k" --root "$ROOT/distill_digits_$k" \
      --name "distill_digits_$k" \
      --title "Digits, 50 labels: DeiT-style distillation, kind $k (configs/distill_digits.py:$k)"
  done
  R --config configs/distill_digits.py:hard --root "$ROOT/distill_digits_alpha0" \
    --override stages.distill.distill.alpha=0 --name distill_digits_alpha0 \
    --title 'Digits, 50 labels: the ViT student without a teacher (configs/distill_digits.py, stages.distill.distill.alpha=0)'
}

# Restore the kept runs of NAME into ROOT/NAME, run CMD..., keep the finished.
kept() {
  local name=$1; shift
  if [ -d "docs/runs/$name" ]; then
    python -m benchmarks.archive "docs/runs/$name" "$ROOT/$name"
  fi
  "$@"
  python -m benchmarks.archive "$ROOT/$name" "docs/runs/$name"
}

stream3() {
  for v in "" ":supervised" ":pseudo_label"; do
    n="vat_mnist${v/:/_}"
    kept "$n" python -m benchmarks.results --seeds 0 1 2 --write \
      --config "configs/vat_mnist.py$v" --root "$ROOT/$n" "${M[@]}" --name "$n" \
      --title "PI-MNIST, 100 labels: configs/vat_mnist.py$v (VAT's TPAMI setting)"
  done
  # One-change ablations of the reproduction (seed 0, beside VAT's seed 0).
  for v in b1_decay batch100; do
    n="vat_mnist_$v"
    kept "$n" python -m benchmarks.results --seeds 0 --write \
      --config "configs/vat_mnist.py:$v" --root "$ROOT/$n" "${M[@]}" --name "$n" \
      --title "PI-MNIST, 100 labels: ablation configs/vat_mnist.py:$v (seed 0)"
  done
  python -m benchmarks.plot_runs --seeds 0 --runs "vat=$ROOT/vat_mnist" \
    "b1_decay=$ROOT/vat_mnist_b1_decay" "batch100=$ROOT/vat_mnist_batch100" \
    --target 1.36 --target-label "VAT, TPAMI 2018" \
    --out docs/figures/vat_mnist_ablations.png
  # The same training, evaluated with BN statistics re-estimated on the
  # unlabeled pool at every evaluation (3 seeds, beside the default's).
  n=vat_mnist_bn_unlabeled
  kept "$n" python -m benchmarks.results --seeds 0 1 2 --write \
    --config configs/vat_mnist.py:bn_unlabeled --root "$ROOT/$n" "${M[@]}" \
    --name "$n" --title "PI-MNIST, 100 labels: configs/vat_mnist.py:bn_unlabeled (BN statistics re-estimated on the unlabeled pool at every evaluation)"
  python -m benchmarks.plot_runs --seeds 0 1 2 --runs "vat=$ROOT/vat_mnist" \
    "vat_bn_unlabeled=$ROOT/$n" --target 1.36 --target-label "VAT, TPAMI 2018" \
    --out docs/figures/vat_mnist_bn_unlabeled.png
  # The reproduction's learning curves and its BatchNorm-statistics diagnostic.
  python -m benchmarks.plot_runs --seeds 0 1 2 --runs "vat=$ROOT/vat_mnist" \
    "pseudo_label=$ROOT/vat_mnist_pseudo_label" \
    "supervised=$ROOT/vat_mnist_supervised" --target 1.36 \
    --target-label "VAT, TPAMI 2018" --out docs/figures/vat_mnist_error.png
  for s in 0 1 2; do
    python -m benchmarks.bn_reestimate --workdir "$ROOT/vat_mnist/$s" \
      --manual-dir "$MNIST" --data-dir "$TFDS"
  done
  kept compare_digits python -m benchmarks.compare --setting digits --methods \
    supervised pseudo_label pi_model temporal_ensembling mean_teacher vat \
    mixmatch uda fixmatch fixmatch_cta flexmatch freematch softmatch adamatch \
    noisy_student r2d2 mpl semimeta --steps 2000 --seeds 0 1 2 \
    --root "$ROOT/compare_digits" --write
  kept compare_mnist_pi python -m benchmarks.compare --setting mnist_pi \
    --methods supervised pseudo_label pi_model mean_teacher vat r2d2 mpl \
    semimeta --steps 6000 --seeds 0 1 2 --root "$ROOT/compare_mnist_pi" \
    "${M[@]}" --write
  # Table (b): long on 2 cores, so one method at a time, each kept in
  # docs/runs as soon as it finishes; the last call reads them all back.
  local cnn=(supervised pseudo_label pi_model temporal_ensembling mean_teacher
             vat mixmatch uda fixmatch fixmatch_cta flexmatch freematch
             softmatch adamatch noisy_student r2d2 mpl semimeta)
  local c=(python -m benchmarks.compare --setting mnist_cnn --steps 2000
           --seeds 0 1 2 --root "$ROOT/compare_mnist_cnn" "${M[@]}")
  for m in "${cnn[@]}"; do
    kept compare_mnist_cnn "${c[@]}" --methods "$m"
  done
  kept compare_mnist_cnn "${c[@]}" --methods "${cnn[@]}" --write
}

# The MNIST-100 teacher-student tables (about an hour a seed on 2 cores: the
# ViT student of distill_mnist, the three stages of noisy_student_mnist), one
# run at a time, each kept in docs/runs as soon as it finishes. Seed-major, so
# that a session that stops early leaves one seed of every table rather than
# three of one; the last calls read the three seeds back and write the tables:
#   STREAMS=4 bash benchmarks/run_results.sh
DISTILL_KINDS=("hard:" "token:" "soft:"
               "alpha0:--override stages.distill.distill.alpha=0")

distill_mnist() {  # distill_mnist KIND:OVERRIDES R-OR-SEED-ARGS...
  local v=$1; shift
  local k=${v%%:*} o=${v#*:}
  local n="distill_mnist_$k" cfg="configs/distill_mnist.py:${k/alpha0/hard}" t=()
  [ -n "${TITLE:-}" ] && t=(--title "MNIST, 100 labels: DeiT-style distillation, $k ($cfg${o:+, ${o#--override }})")
  # shellcheck disable=SC2086
  kept "$n" "$@" --config "$cfg" --root "$ROOT/$n" "${M[@]}" $o --name "$n" "${t[@]}"
}

noisy_student_mnist() {  # noisy_student_mnist R-OR-SEED-ARGS...
  local n=noisy_student_mnist t=()
  [ -n "${TITLE:-}" ] && t=(--title 'MNIST, 100 labels: Noisy Student, a teacher and two rounds (configs/noisy_student_mnist.py)')
  kept "$n" "$@" --config configs/noisy_student_mnist.py --root "$ROOT/$n" \
    "${M[@]}" --name "$n" "${t[@]}"
}

stream4() {
  local s v one=(python -m benchmarks.results --seeds)
  for s in 0 1 2; do
    distill_mnist "${DISTILL_KINDS[0]}" "${one[@]}" "$s"
    distill_mnist "${DISTILL_KINDS[1]}" "${one[@]}" "$s"
    noisy_student_mnist "${one[@]}" "$s"
    distill_mnist "${DISTILL_KINDS[2]}" "${one[@]}" "$s"
    distill_mnist "${DISTILL_KINDS[3]}" "${one[@]}" "$s"
  done
  for v in "${DISTILL_KINDS[@]}"; do TITLE=1 distill_mnist "$v" R; done
  TITLE=1 noisy_student_mnist R
  python -m benchmarks.noisy_student_rounds --root "$ROOT/noisy_student_mnist" \
    --seeds 0 1 2 --name noisy_student_mnist --write \
    --title 'MNIST, 100 labels: Noisy Student, pseudo-labels per round (configs/noisy_student_mnist.py)'
}

for s in ${STREAMS:-1 2}; do
  "stream$s" > "$ROOT/stream$s.log" 2>&1 &
done
wait
echo "done: $ROOT"
