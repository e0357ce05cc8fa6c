#!/usr/bin/env bash
# reproduce_control.sh COMMIT [THREADS]: train the control's config (control-config.json: default tempflow,
# seed 28, digest 787643) for 4 iterations in-process with COMMIT's code (a git worktree of it in /tmp), evaluate
# after the 4th, and count the images whose strict score differs from results/cost/64px-t10's record of seed 28
# after 4 iterations. Fields COMMIT's RunConfig does not know are dropped (its digest of the config is printed).
#   bash results/cost/64px-t10-replication/reproduce_control.sh c718237      # the records' own commit
set -euo pipefail
c=$1; threads=${2:-1}
here="$(cd "$(dirname "$0")" && pwd)"; repo="$(git -C "$here" rev-parse --show-toplevel)"
src=/tmp/tempflow-control-$c
[ -d "$src" ] || git -C "$repo" worktree add -q "$src" "$c"
cd "$src"
OMP_NUM_THREADS=$threads "$repo/.venv/bin/python" -c "
import gzip, json, tempfile
from pydantic import BaseModel
from tempflow_core.config import RunConfig
from tempflow_core.algorithm.train import train_in_process

def known(model, data):
    out = {}
    for k, v in data.items():
        if k in model.model_fields:
            ann = model.model_fields[k].annotation
            sub = isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel)
            out[k] = known(ann, v) if sub else v
    return out

d = known(RunConfig, json.load(open('$here/control-config.json')))
print('digest at $c:', RunConfig.model_validate(d).digest()[:6])
out = tempfile.mkdtemp(prefix='control-')
d['model']['path'] = '$src/models/tiny-shapes-sd3'; d['train']['iterations'] = 4; d['output_dir'] = out
evals = {}
train_in_process(RunConfig.model_validate(d), out, eval_at=lambda it: it == 3, on_eval=lambda it, e: evals.update({it: e}))
rec = [json.loads(l) for l in gzip.decompress(open('$repo/results/cost/64px-t10/images.jsonl.gz', 'rb').read()).decode().splitlines()]
was = {(r['prompt'], r['noise_seed']): r['strict'] for r in rec
       if r['arm'] == 'cost-t10-default-shapes-tempflow' and r['seed'] == 28 and r['iteration'] == 4}
mine = {(s['prompt'], s['seed']): s['strict'] for s in evals[3]['samples']}
print('$c, $threads thread(s): after 4 iterations', sum(mine[k] != was[k] for k in was), 'of', len(was),
      'images differ from the record')
"
