"""Analysis: MLflow runs -> tables, figures and the report; benchmarks (analysis -> raytasks -> unlearn)."""
