"""What people look at: plots, HTML reports (Jinja2 templates, autoescaped) and TensorBoard logs."""
