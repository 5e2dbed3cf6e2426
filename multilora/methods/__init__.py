"""The composition methods (Merge, Switch, Composite, CMLoRA, CLoRA, Compare), built on core and host."""
