"""The embedded demo world, a user of the library rather than part of it: ``build`` trains a small
synthetic-task teacher and a weaker layer-pruned student (cached), ``evaluate`` scores students on its
held-out items, ``demo`` distils with OPD and OPD+ and reports."""
