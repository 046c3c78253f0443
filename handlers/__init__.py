"""HTTP intake: one blueprint per kind of sender, sharing one verify -> validate -> submit path."""
