"""The InstaFlow recipe, one stage per command:

* ``python -m train.pairs``    sample (noise X0, latent X1 = ODE[teacher](X0 | prompt)) pairs into shards;
* ``python -m train.embed``    cache the pairs' text embeddings (the text encoder is frozen in every stage);
* ``python -m train.reflow``   train a (k+1)-rectified flow on pairs (straight interpolation, velocity X1 - X0);
* ``python -m train.distill``  train a one-step student X0 + v(X0) ~ X1 (L2, pseudo-Huber or LPIPS);
* ``python -m train.metrics``  straightness S(Z) and one-step vs N-step distance of a checkpoint;
* ``python -m train.evaluate`` FID and CLIP score over a caption set with reference images (COCO-2017 5k).

The paper's settings are ``train/recipes/instaflow_sd15.toml`` (``--recipe FILE:TABLE``).

Every stage runs unchanged under ``torchrun --nproc_per_node N`` (DDP; gloo on CPU, NCCL on GPUs) and resumes
after a crash without losing finished work.
"""
