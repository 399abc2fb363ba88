"""Measurement code, kept out of the product's packages: the model (`model.py`, `scripts/bench_model.py`), training
data (`data.py`, `scripts/bench_data.py`), recipe (`recipe.py`, `scripts/bench_recipe.py`) and metric (`metric.py`,
`scripts/bench_metric.py`) benchmarks. Import them from their submodules; nothing here is imported by the rest of the
package."""
