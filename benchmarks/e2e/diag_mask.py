"""GPU diagnosis of FastV mode="mask" on the fast path: tokens vs generate(), with and without fused projections and
CUDA graphs, and the reference logits' top-2 margin where they first differ."""
import torch

import mllm_efficiency as me
from mllm_efficiency.fast import release, session_for
from mllm_efficiency.testing import llava_prompt, tiny

torch.manual_seed(0)
NEW = 6
import sys
DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def hf(model, **p):
    return model.generate(**p, max_new_tokens=NEW, do_sample=False)


for cfg in [dict(k=2, ratio=0.5, mode="mask"), dict(k=2, ratio=0.5)]:
    for opts in [dict(), dict(fuse_projections=False), dict(cuda_graph=False),
                 dict(fuse_projections=False, cuda_graph=False)]:
        model = tiny.tiny_llava(num_layers=4).to(DEV)
        handle = me.apply(model, "fastv", **cfg)
        session_for(model, **opts)
        for s in range(3):
            ids, pv = llava_prompt(num_images=2, seed=s)
            p = dict(input_ids=ids.to(DEV), pixel_values=pv.to(DEV))
            ref = hf(model, **p)
            got = me.generate(model, max_new_tokens=NEW, **p)
            L = ids.shape[1]
            same = torch.equal(ref, got)
            msg = ""
            if not same:
                j = int((ref[0, L:] != got[0, L:]).nonzero()[0])
                with torch.no_grad():
                    out = model(input_ids=ref[:, :L + j], pixel_values=p["pixel_values"])
                top = out.logits[0, -1].float().topk(2).values
                msg = f"first diff at step {j}: ref {ref[0, L + j].item()} got {got[0, L + j].item()} " \
                      f"ref top2 margin {float(top[0] - top[1]):.2e}"
            print(cfg.get("mode", "inplace"), opts, "seed", s, "same" if same else "DIFF", msg, flush=True)
        plan = session_for(model).last_plan
        print("   prefill graph", plan.prefill_graph is not None, "eager reason", plan.eager_reason, flush=True)
        handle.remove()
        release(model)
