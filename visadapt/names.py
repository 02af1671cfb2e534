"""Names a command line offers, defined without importing torch: the embedded models, the dense tasks and methods,
SELMA's merge methods, the input normalisations and the evaluation protocols. Parsing a ``train/`` job's arguments
(its ``--help``, a parse error) then loads nothing heavy; the modules that use them (:mod:`visadapt.backbones`,
:mod:`visadapt.data`, :mod:`visadapt.data.transforms`, :mod:`visadapt.data.dense`, :mod:`visadapt.dense`,
:mod:`visadapt.plugins.selma`) take them from here and are where they are documented.
"""

#: the embedded procedural ViT (:func:`visadapt.backbones.create_backbone`)
EMBEDDED_MODEL = "visadapt_procvit_tiny"
#: the embedded procedural Swin
EMBEDDED_SWIN = "visadapt_procswin_tiny"
#: the embedded tiny open_clip CLIP (:func:`visadapt.backbones.create_clip`)
EMBEDDED_CLIP = "visadapt_tiny_clip"
#: the embedded text-to-image pipeline (:func:`visadapt.backbones.create_tiny_sd_pipeline`)
EMBEDDED_SD = "visadapt_tiny_sd"
#: the dense prediction tasks (:mod:`visadapt.data.dense`)
DENSE_TASKS = ("semseg", "human_parts", "sal", "normals")
#: the multi-task set-ups train/dense.py compares (:func:`visadapt.dense.attach_dense_method`)
DENSE_METHODS = ("lite", "polyhistor", "per-task", "shared", "decoder", "full")
#: how train/selma.py merges the skill experts (:func:`visadapt.plugins.selma.merge_expert_files`)
SELMA_MERGE_METHODS = ("average", "ties", "dare")
#: ``--normalize`` choices (:func:`visadapt.data.transforms.resolve_normalization`)
NORMALIZATION_CHOICES = ("model", "imagenet", "none")
# Which splits train and evaluate under each protocol: "final" reports test accuracy after training on
# train+val (VTAB-1k: the 1000-image train800val200); "tune" is the hyper-parameter search split.
PROTOCOLS = {
    "final": {"vtab": ("train800val200", "test"), "fgvc": (("train", "val"), "test")},
    "tune": {"vtab": ("train800", "val200"), "fgvc": ("train", "val")},
}
