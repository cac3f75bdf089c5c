"""The simulator: quanta's own EngineCore on a virtual clock with a cost-model executor. Torch-free."""
