"""Using a trained model: the generation engine and the chat, web and HTTP front ends that call it."""
