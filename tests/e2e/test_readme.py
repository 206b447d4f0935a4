"""The README's Python example runs as written, on a real (tiny) TRL checkpoint.

Only two things are swapped: the checkpoint path (the demo run takes minutes to train) and
the task (an untrained tiny model never solves additions, so every group would have zero
advantage; the digit-share reward gives mixed rewards). Both swaps assert that the text
they replace is still in the README, so an edited example cannot silently go untested.
"""

import math
import re
from pathlib import Path

from stepprobe.demo.train import tiny_grpo_run

README = Path(__file__).resolve().parents[2] / "README.md"
CKPT_ARG = '"runs/demo/full/checkpoint-50"'
TASK_EXPR = 'sp.get_task("arithmetic")'


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README should hold exactly one Python example"
    code = blocks[0]
    assert CKPT_ARG in code and TASK_EXPR in code
    run = tiny_grpo_run(tmp_path / "run", steps=1)
    code = code.replace(CKPT_ARG, repr(str(run.checkpoints[-1])))
    code = code.replace(
        TASK_EXPR,
        'sp.Task([r["prompt"] for r in make_prompts(32, seed=5)], digit_reward)',
    )
    code = code.replace("print(m.table, inf.table)", "")
    ns: dict = {}
    exec("from stepprobe.rollouts.arithmetic import digit_reward, make_prompts\n" + code, ns)
    m, inf, U = ns["m"], ns["inf"], ns["U"]
    assert list(m.table["eta"]) == [0.5, 1.0, 2.0]
    for col in ("estimate", "se", "ci_low", "ci_high", "ess"):
        assert all(math.isfinite(x) for x in m.table[col]), col
    assert len(inf.table) == len(U) == 64
