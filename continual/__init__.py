"""The learning loop: sample store, review export/import, `update` (fine-tune, gate, publish), `rollback`."""
