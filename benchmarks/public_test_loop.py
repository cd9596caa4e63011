"""CoMER's own test loop, unpatched, timed: run by `bench_evaluate.py --public-code` with the public
code's Python (pytorch-lightning 1.4 era), never imported by fastcomer.

    PUBLIC_PYTHON benchmarks/public_test_loop.py COMER_DIR WEIGHTS DATA_ZIP OUT_DIR SETTINGS_JSON

Builds `LitCoMER` with SETTINGS_JSON (the model's hyper-parameters and the search's), loads WEIGHTS
(a `CoMER` state dict) into its `comer_model`, saves it as a checkpoint (OUT_DIR/public.ckpt, for
`fastcomer.evaluate`), then runs `Trainer.test` over `CROHMEDatamodule(DATA_ZIP, '2014',
eval_batch_size=4)` as the public `scripts/test/test.py` does (seed 7), which writes
OUT_DIR/result.zip. Prints one JSON line: {"seconds": the test loop's time, "torch", "threads"}.
"""
import json
import os
import sys
import time

import tqdm.auto  # noqa: F401 - torchmetrics 0.5 reads tqdm.auto without importing it

comer_dir, weights, data, out, settings = sys.argv[1:6]
sys.path.insert(0, comer_dir)

import torch  # noqa: E402
from pytorch_lightning import Trainer, seed_everything  # noqa: E402

from comer.datamodule import CROHMEDatamodule  # noqa: E402
from comer.lit_comer import LitCoMER  # noqa: E402

seed_everything(7)
# the training settings are the published ones (the test loop does not read them)
hparams = dict(early_stopping=False, temperature=1.0, learning_rate=0.08, patience=20, **json.loads(settings))
lit = LitCoMER(**hparams)
lit.comer_model.load_state_dict(torch.load(weights))
os.makedirs(out, exist_ok=True)
torch.save({"state_dict": lit.state_dict(), "hyper_parameters": dict(lit.hparams)}, os.path.join(out, "public.ckpt"))
datamodule = CROHMEDatamodule(zipfile_path=data, test_year="2014", eval_batch_size=4, num_workers=0)
# PL 1.4 names the datamodule's setup flag after its TrainerFn enum as formatted before Python 3.11
# (it fails on 3.11), so the datamodule's own setup and test loader are called here, as Trainer.test
# calls them.
datamodule.setup(stage="test")
loader = datamodule.test_dataloader()
trainer = Trainer(logger=False, gpus=0, checkpoint_callback=False, progress_bar_refresh_rate=0)
os.chdir(out)  # test_epoch_end writes result.zip in the working directory
start = time.perf_counter()
trainer.test(lit, dataloaders=loader, verbose=False)
print(json.dumps({"seconds": time.perf_counter() - start, "torch": torch.__version__,
                  "threads": torch.get_num_threads()}))
