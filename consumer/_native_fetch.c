/* The worker's fetch straight from librdkafka (consumer/native_fetch.py says when it is used).
 *
 * The fetch queues of the partitions held are forwarded (rd_kafka_queue_forward, public
 * librdkafka API) to a queue of our own; poll() serves it with rd_kafka_consume_batch_queue,
 * the GIL released, and builds per partition the offsets, keys and values lists the worker
 * hands on: no confluent-kafka Message object per record. Rebalances, errors of the client
 * and the group stay on the consumer's own queue, served by confluent-kafka's consume().
 *
 * librdkafka is the one confluent-kafka loaded (its path is given to bind()), its handle
 * the first field of confluent-kafka's Handle; bind() checks it names a consumer whose
 * name starts as expected before anything else is done with it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_queue_s rd_kafka_queue_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct {             /* rd_kafka_message_t of rdkafka.h (a stable public ABI) */
    int err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

#define RD_KAFKA_CONSUMER 1
#define MAX_POLL 100000

static struct {
    rd_kafka_queue_t *(*queue_new)(rd_kafka_t *);
    rd_kafka_queue_t *(*queue_get_partition)(rd_kafka_t *, const char *, int32_t);
    void (*queue_forward)(rd_kafka_queue_t *, rd_kafka_queue_t *);
    void (*queue_destroy)(rd_kafka_queue_t *);
    ssize_t (*consume_batch_queue)(rd_kafka_queue_t *, int, rd_kafka_message_t **, size_t);
    void (*message_destroy)(rd_kafka_message_t *);
    int (*type)(const rd_kafka_t *);
    const char *(*name)(const rd_kafka_t *);
    const char *(*err2str)(int);
} lib;

typedef struct {
    PyObject_HEAD
    PyObject *owner;          /* the confluent-kafka Consumer: kept alive while we are */
    rd_kafka_t *rk;
    rd_kafka_queue_t *queue;  /* NULL once closed */
    char *topic;
    rd_kafka_message_t **messages;  /* poll()'s buffer: one poll at a time (``busy``) */
    int busy;
} Fetch;

static int load(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        PyErr_Format(PyExc_OSError, "librdkafka not loaded from %s", path);
        return -1;
    }
#define SYM(field, symbol)                                                              \
    *(void **)(&lib.field) = dlsym(h, symbol);                                          \
    if (lib.field == NULL) {                                                            \
        PyErr_Format(PyExc_OSError, "librdkafka at %s has no %s", path, symbol);        \
        return -1;                                                                      \
    }
    SYM(queue_new, "rd_kafka_queue_new")
    SYM(queue_get_partition, "rd_kafka_queue_get_partition")
    SYM(queue_forward, "rd_kafka_queue_forward")
    SYM(queue_destroy, "rd_kafka_queue_destroy")
    SYM(consume_batch_queue, "rd_kafka_consume_batch_queue")
    SYM(message_destroy, "rd_kafka_message_destroy")
    SYM(type, "rd_kafka_type")
    SYM(name, "rd_kafka_name")
    SYM(err2str, "rd_kafka_err2str")
#undef SYM
    return 0;
}

/* The consumer's handle, read again: confluent-kafka clears it when the consumer closes
 * (and destroys it, our queue's memory with it). */
static rd_kafka_t *handle_of(PyObject *consumer) {
    return *(rd_kafka_t **)((char *)consumer + sizeof(PyObject));
}

static int usable(Fetch *self) {
    if (self->queue != NULL && handle_of(self->owner) == self->rk)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "the fetch or its consumer is closed");
    return 0;
}

static void Fetch_close_queue(Fetch *self) {
    if (self->queue != NULL && handle_of(self->owner) == self->rk)
        lib.queue_destroy(self->queue);
    self->queue = NULL;
}

static void Fetch_dealloc(Fetch *self) {
    Fetch_close_queue(self);
    Py_XDECREF(self->owner);
    PyMem_Free(self->topic);
    PyMem_Free(self->messages);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int forward_each(Fetch *self, PyObject *partitions, int on) {
    PyObject *seq = PySequence_Fast(partitions, "partitions must be a sequence of ints");
    if (seq == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long p = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (p == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        rd_kafka_queue_t *pq = lib.queue_get_partition(self->rk, self->topic, (int32_t)p);
        if (pq == NULL) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_RuntimeError, "no fetch queue for partition %ld", p);
            return -1;
        }
        lib.queue_forward(pq, on ? self->queue : NULL);
        lib.queue_destroy(pq);
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *Fetch_forward(Fetch *self, PyObject *partitions) {
    if (!usable(self))
        return NULL;
    if (forward_each(self, partitions, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Fetch_close(Fetch *self, PyObject *partitions) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "close() while another thread polls");
        return NULL;
    }
    if (self->queue != NULL && handle_of(self->owner) == self->rk
        && forward_each(self, partitions, 0) < 0)
        return NULL;
    Fetch_close_queue(self);
    Py_RETURN_NONE;
}

/* Append one record to its partition's (offsets, keys, values) in ``out``. */
static int append(PyObject *out, const rd_kafka_message_t *m) {
    PyObject *pkey = PyLong_FromLong(m->partition);
    if (pkey == NULL)
        return -1;
    PyObject *lists = PyDict_GetItemWithError(out, pkey);
    if (lists == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(pkey);
            return -1;
        }
        lists = Py_BuildValue("([][][])");
        if (lists == NULL || PyDict_SetItem(out, pkey, lists) < 0) {
            Py_XDECREF(lists);
            Py_DECREF(pkey);
            return -1;
        }
        Py_DECREF(lists);  /* borrowed from ``out`` from here on */
    }
    Py_DECREF(pkey);
    PyObject *offset = PyLong_FromLongLong(m->offset);
    PyObject *key = m->key != NULL
        ? PyBytes_FromStringAndSize((const char *)m->key, (Py_ssize_t)m->key_len)
        : Py_NewRef(Py_None);
    PyObject *value = m->payload != NULL
        ? PyBytes_FromStringAndSize((const char *)m->payload, (Py_ssize_t)m->len)
        : Py_NewRef(Py_None);
    int rc = -1;
    if (offset != NULL && key != NULL && value != NULL
        && PyList_Append(PyTuple_GET_ITEM(lists, 0), offset) == 0
        && PyList_Append(PyTuple_GET_ITEM(lists, 1), key) == 0
        && PyList_Append(PyTuple_GET_ITEM(lists, 2), value) == 0)
        rc = 0;
    Py_XDECREF(offset);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc;
}

static PyObject *error_of(const rd_kafka_message_t *m) {
    const char *text = m->payload != NULL ? (const char *)m->payload : lib.err2str(m->err);
    Py_ssize_t len = m->payload != NULL ? (Py_ssize_t)m->len : (Py_ssize_t)strlen(text);
    PyObject *reason = PyUnicode_DecodeUTF8(text, len, "replace");
    if (reason == NULL)
        return NULL;
    return Py_BuildValue("(iiN)", (int)m->partition, m->err, reason);
}

/* poll(max_records, timeout_ms) -> ({partition: (offsets, keys, values)}, [(partition,
 * code, text)], records): what the forwarded queue holds, at most ``max_records``, waiting
 * up to ``timeout_ms`` for the first. Every message is destroyed, whatever happens. */
static PyObject *Fetch_poll(Fetch *self, PyObject *args) {
    Py_ssize_t wanted;
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "ni", &wanted, &timeout_ms))
        return NULL;
    if (!usable(self))
        return NULL;
    if (wanted < 1 || wanted > MAX_POLL) {
        PyErr_Format(PyExc_ValueError, "max_records must be 1..%d", MAX_POLL);
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "poll() called from two threads at once");
        return NULL;
    }
    ssize_t n;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    n = lib.consume_batch_queue(self->queue, timeout_ms, self->messages, (size_t)wanted);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyObject *out = PyDict_New();
    PyObject *errors = PyList_New(0);
    Py_ssize_t records = 0;
    int failed = out == NULL || errors == NULL;
    for (ssize_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = self->messages[i];
        if (!failed) {
            if (m->err != 0) {
                PyObject *e = error_of(m);
                failed = e == NULL || PyList_Append(errors, e) < 0;
                Py_XDECREF(e);
            } else {
                failed = append(out, m) < 0;
                records++;
            }
        }
        lib.message_destroy(m);
    }
    if (n < 0 && !failed) {
        PyErr_SetString(PyExc_RuntimeError, "rd_kafka_consume_batch_queue failed");
        failed = 1;
    }
    if (failed) {
        Py_XDECREF(out);
        Py_XDECREF(errors);
        return NULL;
    }
    return Py_BuildValue("(NNn)", out, errors, records);
}

static PyMethodDef Fetch_methods[] = {
    {"forward", (PyCFunction)Fetch_forward, METH_O,
     "forward(partitions): their fetch queues feed this fetch from now on"},
    {"poll", (PyCFunction)Fetch_poll, METH_VARARGS,
     "poll(max_records, timeout_ms) -> (batches, errors, records)"},
    {"close", (PyCFunction)Fetch_close, METH_O,
     "close(partitions): stop forwarding them and drop the queue (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FetchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "consumer._native_fetch.Fetch",
    .tp_basicsize = sizeof(Fetch),
    .tp_dealloc = (destructor)Fetch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The worker's partitions fetched from librdkafka without Message objects.",
    .tp_methods = Fetch_methods,
};

/* bind(consumer, library_path, topic, name_prefix) -> Fetch */
static PyObject *bind(PyObject *module, PyObject *args) {
    PyObject *consumer;
    const char *path, *topic, *prefix;
    (void)module;
    if (!PyArg_ParseTuple(args, "Osss", &consumer, &path, &topic, &prefix))
        return NULL;
    if (lib.queue_new == NULL && load(path) < 0)
        return NULL;
    rd_kafka_t *rk = handle_of(consumer);
    if (rk == NULL || lib.type(rk) != RD_KAFKA_CONSUMER
        || strncmp(lib.name(rk), prefix, strlen(prefix)) != 0) {
        PyErr_SetString(PyExc_TypeError, "not an open confluent-kafka Consumer");
        return NULL;
    }
    Fetch *self = PyObject_New(Fetch, &FetchType);
    if (self == NULL)
        return NULL;
    self->owner = Py_NewRef(consumer);
    self->rk = rk;
    self->queue = NULL;
    self->topic = NULL;
    self->busy = 0;
    self->messages = PyMem_Calloc(MAX_POLL, sizeof(rd_kafka_message_t *));
    size_t len = strlen(topic) + 1;
    self->topic = PyMem_Malloc(len);
    if (self->messages == NULL || self->topic == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    memcpy(self->topic, topic, len);
    self->queue = lib.queue_new(rk);
    if (self->queue == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_RuntimeError, "rd_kafka_queue_new failed");
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef module_methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(consumer, library_path, topic, name_prefix) -> Fetch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "consumer._native_fetch",
    "The worker's fetch straight from librdkafka.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native_fetch(void) {
    if (PyType_Ready(&FetchType) < 0)
        return NULL;
    return PyModule_Create(&module);
}
