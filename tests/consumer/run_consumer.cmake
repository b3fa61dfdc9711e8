# ctest find_package_consumer: install the build tree into a private prefix, then configure,
# build and run tests/consumer against it. Run with cmake -P and the -D variables below.
foreach(var MAMBA3_BUILD_DIR CONSUMER_SOURCE_DIR CONSUMER_PREFIX CONSUMER_BUILD_DIR
            CONSUMER_GENERATOR CONSUMER_CXX_COMPILER CONSUMER_CONFIG)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run_step what)
  message(STATUS "consumer: ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer: ${what} failed (${rc})")
  endif()
endfunction()

file(REMOVE_RECURSE "${CONSUMER_PREFIX}" "${CONSUMER_BUILD_DIR}")
run_step(install ${CMAKE_COMMAND} --install "${MAMBA3_BUILD_DIR}" --prefix "${CONSUMER_PREFIX}"
         --config "${CONSUMER_CONFIG}")
run_step(configure ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BUILD_DIR}"
         -G "${CONSUMER_GENERATOR}" "-DCMAKE_CXX_COMPILER=${CONSUMER_CXX_COMPILER}"
         "-DCMAKE_BUILD_TYPE=${CONSUMER_CONFIG}" "-DCMAKE_PREFIX_PATH=${CONSUMER_PREFIX}")
run_step(build ${CMAKE_COMMAND} --build "${CONSUMER_BUILD_DIR}")
run_step(run "${CONSUMER_BUILD_DIR}/consumer")
