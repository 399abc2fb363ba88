"""Fine-tuning: recipes (`recipes.py` + `recipes/*.yaml`), optimiser and schedule (`optim.py`), the training data
stream (`data.py`) and the Accelerate loop (`finetune.py`)."""

from .recipes import Recipe, available_recipes, load_recipe, unpublished_recipes

__all__ = ["Recipe", "available_recipes", "load_recipe", "unpublished_recipes"]
