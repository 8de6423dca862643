"""Drop-ins for other libraries' APIs, computed by fastrit.

- :class:`KnowledgeNeurons`: the knowledge-neurons package (``from knowledge_neurons import KnowledgeNeurons``).
"""

from .knowledge_neurons import KnowledgeNeurons

__all__ = ["KnowledgeNeurons"]
