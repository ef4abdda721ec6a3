"""LiT (locked-image text tuning): contrastive text towers on a locked image tower's cached features.

    from vitdistill.lit import run_lit
    report = run_lit(cache_dir, cfg.lit)
"""

from vitdistill.lit.data import PROMPT_TEMPLATES, LitData, LitSplit, class_prompts, load_lit_data, prompt_templates
from vitdistill.lit.evaluate import recall_at_k, zeroshot_classifier, zeroshot_predict
from vitdistill.lit.losses import (
    LIT_LOSSES,
    SigmoidContrastiveLoss,
    SoftmaxContrastiveLoss,
    create_lit_loss,
    list_lit_losses,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)
from vitdistill.lit.model import LitModel
from vitdistill.lit.stage import LitReport, run_lit
from vitdistill.lit.text import TEXT_TOWERS, TextTower, WordTokenizer, create_text_tower, list_text_towers
from vitdistill.lit.train import train_lit

__all__ = [
    "LIT_LOSSES", "PROMPT_TEMPLATES", "TEXT_TOWERS", "LitData", "LitModel", "LitReport", "LitSplit",
    "SigmoidContrastiveLoss", "SoftmaxContrastiveLoss", "TextTower", "WordTokenizer", "class_prompts",
    "create_lit_loss", "create_text_tower", "list_lit_losses", "list_text_towers", "load_lit_data",
    "prompt_templates", "recall_at_k", "run_lit", "sigmoid_contrastive_loss", "softmax_contrastive_loss",
    "train_lit", "zeroshot_classifier", "zeroshot_predict",
]
