"""The pure math of A3, functions over tensors: solvers, linear algebra, size budgets, mixed allocation."""
