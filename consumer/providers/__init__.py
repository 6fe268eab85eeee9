"""Provider adapters: one per channel, all behind :class:`consumer.providers.base.Provider`."""
