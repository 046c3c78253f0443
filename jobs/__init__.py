"""What workers run: cancel, notify (and resolve for events); records, policy and the fast submit path."""
